"""`babyllama serve`: the OpenAI-compatible server and its chat page."""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import QUANTIZE_KINDS, ServeConfig
from ..errors import BabyLlamaError, missing_extra, say, warn
from .common import QUANTIZE_HELP, add_chat_template, add_model_flags, add_threads, chat_template

if TYPE_CHECKING:
    from ..api import Model

DEFAULTS = ServeConfig()  # the flags' defaults: ServeConfig's, the one place they are written


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a chat page",
                       description="Serve a model over HTTP: OpenAI's /v1/completions and /v1/chat/completions "
                                   "(streamed or not), /v1/models, /health, /metrics, and a chat page at /. "
                                   "Requests share the engine through continuous batching; a prompt that starts "
                                   "with what a free slot's cache holds prefills only the rest.")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--slots", type=int, default=DEFAULTS.slots, help=f"sequences generated at once ({DEFAULTS.slots})")
    p.add_argument("--queue", type=int, default=DEFAULTS.queue,
                   help=f"choices that may wait for a slot (those that find one free do not wait); beyond, 429 "
                        f"({DEFAULTS.queue})")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    p.add_argument("--cors-origin", type=cors_origin, action="append", default=None, metavar="ORIGIN",
                   help="let pages of ORIGIN (such as https://example.com) call the API from a browser; repeat for "
                        "more; the chat page at / is this server's own (default: any origin, *)")
    p.add_argument("--quantize", choices=QUANTIZE_KINDS, default=None, help=QUANTIZE_HELP)
    add_chat_template(p)
    p.add_argument("--model-name", default=None,
                   help="the model id clients name (default: with --lora the adapter's name, else the model "
                        "card's name, else the file's name)")
    p.add_argument("--timeout", type=float, default=DEFAULTS.timeout_s,
                   help=f"seconds a request may take, from its arrival: its body's upload and queueing included "
                        f"({DEFAULTS.timeout_s:g})")
    p.add_argument("--header-timeout", type=float, default=DEFAULTS.header_timeout_s, metavar="SECONDS",
                   help="close a connection whose request line and headers have not all arrived this long after it "
                        "opened or after its previous answer, and reset one whose client has taken nothing of its "
                        "answer for this long while the server's buffer for it is full "
                        f"({DEFAULTS.header_timeout_s:g})")
    p.add_argument("--max-connections", type=int, default=DEFAULTS.max_connections, metavar="N",
                   help="open connections served at once; a request on one past them gets 503 with Retry-After "
                        f"({DEFAULTS.max_connections})")
    p.add_argument("--max-body", type=int, default=DEFAULTS.max_body_bytes, metavar="BYTES",
                   help=f"largest request body ({DEFAULTS.max_body_bytes:,} bytes)")
    p.add_argument("--chunk", type=int, default=DEFAULTS.max_tokens_per_step, metavar="TOKENS",
                   help=f"prompt tokens prefilled per step beside the running decodes ({DEFAULTS.max_tokens_per_step})")
    p.add_argument("--prefix-min", type=int, default=DEFAULTS.prefix_min, metavar="TOKENS",
                   help=f"reuse a free slot's cached prefix of at least this many tokens; 0 = never "
                        f"({DEFAULTS.prefix_min})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level; info logs a line per request, on stderr as every other line (info)")
    add_threads(p)
    p.set_defaults(func=cmd_serve)


DEFAULT_PORTS = {"http": 80, "https": 443}


def cors_origin(text: str) -> str:
    """An argparse value: an Origin as a browser sends it (scheme://host[:port], host in lower case and ASCII,
    a scheme's default port left out), or * for any."""
    if text == "*":
        return text
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?", text)
    if m is None or (m[3] is not None and not 0 < int(m[3]) < 65536):
        raise argparse.ArgumentTypeError(f"not an origin: {text!r} (scheme://host[:port] as a browser sends it, such "
                                         "as https://example.com: no path, trailing slash or user name, an "
                                         "international host in its xn-- form; * for any)")
    scheme, host = m[1].lower(), m[2].lower()
    port = None if m[3] is None or int(m[3]) == DEFAULT_PORTS.get(scheme) else int(m[3])
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def check_flags(args: argparse.Namespace) -> None:
    for name, value, low in (("--port", args.port, 0), ("--slots", args.slots, 1), ("--queue", args.queue, 1),
                             ("--chunk", args.chunk, 1), ("--prefix-min", args.prefix_min, 0),
                             ("--max-body", args.max_body, 1), ("--max-connections", args.max_connections, 1)):
        if value < low:
            raise BabyLlamaError(f"{name} must be >= {low}, got {value}")
    if not args.host.strip():
        # an unset variable (--host "$HOST"): it would listen on every address, and name its URL http://:PORT
        raise BabyLlamaError("--host must not be empty (0.0.0.0 and :: listen on every address)")
    if args.port > 65535:
        raise BabyLlamaError(f"--port must be <= 65535, got {args.port}")
    for name, seconds in (("--timeout", args.timeout), ("--header-timeout", args.header_timeout)):
        if not 0 < seconds < math.inf:
            raise BabyLlamaError(f"{name} must be a finite number of seconds > 0, got {seconds:g}")
    if args.model_name is not None and not args.model_name.strip():
        raise BabyLlamaError("--model-name must not be empty (leave it out to serve under the model's own name)")
    if args.api_key is not None and not args.api_key.strip():
        raise BabyLlamaError("--api-key must not be empty")
    if args.api_key is not None and not (args.api_key.isascii() and args.api_key.isprintable()):
        # HTTP headers carry ASCII: a client could never send such a key
        raise BabyLlamaError("--api-key must be printable ASCII (it travels in an HTTP header)")
    if args.api_key is not None and args.api_key != args.api_key.strip():
        # HTTP drops the spaces around a header's value, and the bearer scheme those before the key
        raise BabyLlamaError("--api-key must not begin or end with a space (a client could never send them)")


def unbracketed(host: str) -> str:
    """The host as getaddrinfo takes it: an IPv6 address written as in a URL ([::1]) is the address (::1)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_name(checkpoint: str | None, lora: str | None, card: dict) -> str:
    """The model id clients send when --model-name is not given: with an adapter, the adapter's name (a client of
    the tuned model must not be told it talks to the base), else the model card's name, else the model file's."""
    if lora is not None:
        return adapter_name(Path(lora))
    return card.get("name") or (Path(checkpoint).name if checkpoint else "babyllama")


def adapter_name(path: Path) -> str:
    """An adapter's name: its folder's (a run's out_dir holds adapter.safetensors and adapter.json, the names
    training gives them), else its file's stem."""
    from ..adapter import ADAPTER_FILE

    if path.is_dir() or path.stem == Path(ADAPTER_FILE).stem:
        folder = path if path.is_dir() else path.parent
        return folder.resolve().name or str(path)
    return path.stem


def cmd_serve(args: argparse.Namespace) -> int:
    check_flags(args)
    args.host = unbracketed(args.host)
    try:
        from .. import serve
    except ImportError as e:  # the released package's install command and a source checkout's
        raise missing_extra(f"babyllama serve ({e.name} is missing)", "serve") from None
    from ..api import load
    from ..engine import kv_cache_name
    from ..loading import model_card

    # what the card is read for: neither with an adapter (its own name, Llama 2's template), nor what a flag gives
    needed = [] if args.lora else [key for key, flag in (("chat_template", args.chat_template),
                                                          ("name", args.model_name)) if not flag]
    card = model_card(args.checkpoint, strict=needed)
    template = chat_template(args, card)  # an unknown name is a one-line error now, not a 400 on every chat request
    model = load(args.checkpoint, args.tokenizer, quantize=args.quantize, lora=args.lora, kv_cache=args.kv_cache)
    name = args.model_name or served_name(args.checkpoint, args.lora, card)
    config = ServeConfig(model_name=name, slots=args.slots, queue=args.queue,
                               api_key=args.api_key, max_body_bytes=args.max_body, timeout_s=args.timeout,
                               header_timeout_s=args.header_timeout, max_connections=args.max_connections,
                               max_tokens_per_step=args.chunk, prefix_min=args.prefix_min, chat_template=template,
                               cors_origins=tuple(args.cors_origin or DEFAULTS.cors_origins))
    check_slots_fit(model, args.slots)
    warm_up(model.engine)
    app = serve.create_app(model, config)
    sockets = serve.listen(args.host, args.port)
    port = args.port or sockets[0].getsockname()[1]  # --port 0: the free port the system chose
    if not is_loopback(args.host) and not args.api_key:
        warn(f"listening on {args.host} without --api-key: anyone who reaches this address "
             "can use the model")
    slots = f"{args.slots} slot{'s' if args.slots != 1 else ''}"
    say(f"babyllama: {model.description}; serving {config.model_name!r} on "
        f"http://{serve.address(args.host, port)} ({slots}, {kv_cache_name(model.engine.kv_dtype)} KV cache)")
    stopped_by = serve.run(app, sockets, args.log_level)
    return 0 if stopped_by is None else 128 + stopped_by  # the shell's status for a process a signal ended


def check_slots_fit(model: Model, slots: int) -> None:
    """Refuses a batch's KV cache (--slots of the whole context each) that cannot fit in memory, naming the
    flags that shrink it (the cache itself would name `run`'s)."""
    from ..engine import kv_cache_layout
    from ..memory import check_fits

    seq_len = model.args.max_seq_len
    _, nbytes = kv_cache_layout(model.args, slots, seq_len, model.engine.kv_dtype)
    check_fits(nbytes, f"the KV cache of {slots} slots x {seq_len:,} positions (the model's context)",
               "lower --slots, or choose a smaller --kv-cache (f16, or q8_0: about half of f16)")


def warm_up(engine) -> None:
    """One decode step in a cache of its own: the kernels are built (on a machine's first use: a minute or
    more) and loaded now, as `run`'s first step does, so that the server listens, and /health says ok, only
    once a request can be answered at once."""
    from ..tokenizer import BOS

    engine.forward([BOS], [0], engine.new_cache(1, 1), logits="last")
