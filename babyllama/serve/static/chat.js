// The chat page: posts the conversation to /v1/chat/completions and shows the streamed reply. Its URLs are
// relative to the page's (as are index.html's), so that it works behind a proxy that serves it under a path.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far: user and assistant turns, alternating
let controller = null;
let conversation = 0;  // counts "New conversation" clicks: a reply still streaming then belongs to none

// llama.cpp's sampling controls: [input, the request field serve reads, the value that is off]. Each is sent only
// when set (an input left empty is off), so that a page left at its defaults sends what it always did
const CONTROLS = [["top-k", "top_k", 0], ["min-p", "min_p", 0], ["repeat-penalty", "repeat_penalty", 1],
                  ["repeat-last-n", "repeat_last_n", 64], ["presence-penalty", "presence_penalty", 0],
                  ["frequency-penalty", "frequency_penalty", 0]];

function controls() {
  const fields = {};
  for (const [id, field, off] of CONTROLS) {
    const text = $(id).value.trim();
    if (text !== "" && +text !== off) fields[field] = +text;
  }
  return fields;
}

const SLIDERS = ["temperature", "top-p", "min-p", "presence-penalty", "frequency-penalty"];  // each with an output
for (const id of SLIDERS) {
  $(id).addEventListener("input", () => { $(id + "-out").value = $(id).value; });
}

// The conversation (what the log shows, and the turns sent) and the settings outlive a reload of the page (a
// phone's browser reloads a tab it had put away): kept for the tab's session, as the key is
const SETTINGS = ["system", "max-tokens", ...SLIDERS, ...CONTROLS.map(([id]) => id)];

// storage refused (full, or turned off by the browser's settings) only means that a reload forgets
function keep(name, value) {
  try { sessionStorage.setItem(name, value); } catch (e) {}
}

// `pending`: the text of a turn still waiting for its reply, which a reload puts back in the message box (its
// two bubbles and its history entry are not kept: a reply still streaming is lost)
function saveConversation(pending = null) {
  const divs = [...$("log").children].slice(0, pending === null ? undefined : -2);
  const log = divs.map((div) => [div.className.replace("msg ", ""), div.textContent]);
  const turns = pending === null ? history : history.slice(0, -1);
  keep("babyllama-conversation", JSON.stringify({history: turns, log, pending}));
}

function saveSettings() {
  keep("babyllama-settings", JSON.stringify(Object.fromEntries(SETTINGS.map((id) => [id, $(id).value]))));
}

function restore() {
  try {
    const settings = JSON.parse(sessionStorage.getItem("babyllama-settings")) || {};
    for (const id of SETTINGS) if (typeof settings[id] === "string") $(id).value = settings[id];
    for (const id of SLIDERS) $(id + "-out").value = $(id).value;
    if (Object.keys(controls()).length) $("more-sampling").open = true;  // a control in use is in sight
    const saved = JSON.parse(sessionStorage.getItem("babyllama-conversation"));
    if (!saved) return;
    history.push(...saved.history);
    for (const [role, text] of saved.log) bubble(role, text);
    if (typeof saved.pending === "string" && !$("prompt").value) $("prompt").value = saved.pending;
  } catch (e) {}  // nothing usable saved: a fresh page
}

try { $("api-key").value = sessionStorage.getItem("babyllama-key") || ""; } catch (e) {}
$("api-key").addEventListener("change", () => keep("babyllama-key", $("api-key").value));

// A key with other characters than printable ASCII can be no server's (serve refuses such an --api-key), and
// fetch would refuse to send it with a TypeError that request() could not tell from a server that is gone
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (!/^[\x20-\x7e]*$/.test(key)) throw new Error("the API key typed has characters an API key cannot have "
                                                    + "(it is printable ASCII)");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// Text added to the log: the log follows it to the bottom, unless the reader has scrolled up to read (a line's
// height from the bottom or more), where it is left; a message the user sends is always brought into view
function follow(add, always = false) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 20;
  add();
  if (atBottom || always) log.scrollTop = log.scrollHeight;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  follow(() => $("log").appendChild(div), role === "user");
  return div;
}

// the server's error, or for an answer that is not one (a proxy's page) its status: "502 Bad Gateway"
async function errorOf(response) {
  const status = {message: (response.status + " " + response.statusText).trim()};
  let error;
  try { error = (await response.json()).error; }
  catch (e) { return status; }
  if (typeof error === "string" && error) return {message: error};  // {"error": "..."}: another server's shape
  return error && error.message ? error : status;
}

// A browser says only "Failed to fetch" (or "network error") when the server is gone: these say which
const UNREACHABLE = "cannot reach the server: is babyllama serve still running?";
const LOST = "the connection to the server was lost before the reply was complete";
const EVENT_END = /\r\n\r\n|\n\n|\r\r/;  // a server-sent event's blank line

// fetch, whose network failure becomes UNREACHABLE (an abort stays an abort)
async function request(url, init) {
  try { return await fetch(url, init); }
  catch (e) { throw e.name === "AbortError" ? e : new Error(UNREACHABLE); }
}

// the next piece of a streamed answer, whose network failure becomes LOST
async function readPiece(reader) {
  try { return await reader.read(); }
  catch (e) { throw e.name === "AbortError" ? e : new Error(LOST); }
}

// Posts the conversation; while it is too long for the model's context, leaves out its oldest exchange (a user
// turn and its reply; the system prompt stays) and tries again, until only the new turn is left. Returns the
// response and how many turns of `history` it left out.
async function postConversation(signal, maxTokens) {
  for (let dropped = 0; ; dropped += 2) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({role: "system", content: system});
    messages.push(...history.slice(dropped));
    const r = await request("v1/chat/completions", {
      method: "POST", headers: headers(), signal,
      body: JSON.stringify({messages, stream: true, temperature: +$("temperature").value,
                            top_p: +$("top-p").value, max_tokens: maxTokens,
                            ...controls(), stream_options: {include_usage: true},
                            logprobs: true}),  // a chunk's tokens, one entry each: the live tokens/s counts them
    });
    const type = r.headers.get("content-type") || "";
    if (r.ok && !type.startsWith("text/event-stream")) {  // a proxy's page, say: no reply, and no lost connection
      throw new Error(`the answer is not a stream of events but ${type || "of no content type"}: is a proxy ` +
                      "in the way?");
    }
    if (r.ok) return {r, dropped};
    const error = await errorOf(r);
    if (error.code !== "context_length_exceeded" || history.length - dropped < 3) throw new Error(error.message);
  }
}

// the model's name, or (on a 401) what is wrong with the key: none typed, or one the server refuses; or the error
async function loadModel() {
  let r;
  try { r = await request("v1/models", {headers: headers()}); }
  catch (e) { $("status").textContent = "Error: " + e.message; return; }
  if (r.ok) {
    $("model").textContent = (await r.json()).data[0].id;
    $("status").textContent = "";
  } else if (r.status === 401) {
    $("model").textContent = "";
    $("status").textContent = $("api-key").value.trim() ? "The server refused this API key."
                                                        : "This server needs an API key: type it in the API key field.";
  } else {
    $("model").textContent = "";
    $("status").textContent = "Error: " + (await errorOf(r)).message;
  }
}

async function send(text) {
  const mine = conversation;
  history.push({role: "user", content: text});
  const asked = bubble("user", text);
  const out = bubble("assistant", "");
  const endHint = hintWhileWaiting(out);
  saveConversation(text);
  controller = new AbortController();
  if (document.activeElement === $("send")) $("prompt").focus();  // disabled, it would leave the focus nowhere
  $("send").disabled = true; $("stop").disabled = false; $("status").textContent = "";
  clearSpeed();  // the figure is the last reply's until this one's can be measured
  // counted: tokens so far (a chunk carries every token that came since the last one); atFirst: those that came
  // with the first text, before the clock of the tokens/s figure starts
  let reply = "", tokens = 0, counted = 0, atFirst = 0, first = null, reason = null, failed = false, complete = false;
  const maxTokens = +$("max-tokens").value || undefined;  // none: the rest of the context
  const notes = [];  // what the status line says of this turn
  try {
    const {r, dropped} = await postConversation(controller.signal, maxTokens);
    if (dropped) {
      history.splice(0, dropped);  // the next turns would not fit with them either
      notes.push("earliest turns left out to fit the model's context");
      say(notes);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await readPiece(reader);
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      // events end with a blank line; lines end with "\r\n", "\n" or "\r" (the format allows each)
      let m;
      while ((m = buffer.match(EVENT_END)) !== null) {
        const event = buffer.slice(0, m.index).replace(/\r\n?/g, "\n");
        buffer = buffer.slice(m.index + m[0].length);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (data === "[DONE]") complete = true;
        if (!data || complete) continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const c of chunk.choices) {
          if (c.logprobs && c.logprobs.content) counted += c.logprobs.content.length;
          if (c.delta && c.delta.content) {
            if (first === null) { first = performance.now(); atFirst = counted; endHint(); }
            reply += c.delta.content;
            follow(() => { out.textContent = reply; });
          }
          if (c.finish_reason) reason = c.finish_reason;
        }
        if (first !== null && counted > atFirst) showSpeed(counted - atFirst, first, counted);
      }
    }
    if (!complete) throw new Error(LOST);  // the answer ends with [DONE]: a server killed mid-reply sends none
    if (first !== null && tokens > atFirst) showSpeed(tokens - atFirst, first, tokens);
    $("speed").dataset.tokens = tokens;  // also where the reply came too fast to time
  } catch (e) {
    if (e.name === "AbortError") reason = "stopped";
    else {
      failed = true;
      follow(() => { out.className = "msg error"; out.textContent = "Error: " + e.message; });
    }
  } finally {
    endHint();
    controller = null;
    const stopFocused = document.activeElement === $("stop");
    $("send").disabled = false; $("stop").disabled = true;
    if (stopFocused) $("prompt").focus();  // Stop pressed from the keyboard: back to writing
  }
  if (mine !== conversation) return;  // the conversation was cleared meanwhile, this turn with it
  // a turn without a reply leaves the conversation as it was (the next user turn must follow a reply)
  if (failed || !reply) history.pop();
  else history.push({role: "assistant", content: reply});
  if (!failed && !reply) {  // so are its bubbles, which would show a turn the model is not sent; the text goes
    asked.remove(); out.remove();  // back in the box, to send again
    if (!$("prompt").value) $("prompt").value = text;
  }
  saveConversation();
  if (!failed && !reply) {
    notes.push((reason === "stopped" ? "stopped before any text" : "the model ended its reply before any text")
               + ": this turn is left out of the conversation");
  }
  else if (reason === "length") {
    notes.push(maxTokens ? "reply cut at max tokens" : "reply cut at the end of the model's context");
  }
  else if (reason === "stopped") notes.push("stopped");
  say(notes);
}

// The status line's notes on this turn: a line that appears shortens the log above it, which then follows
// (the reply's last line would be left under its edge)
function say(notes) {
  follow(() => { $("status").textContent = notes.join("; "); });
}

// A reply with no text a second after it was asked for waits for a free slot (the server's slots all busy), or
// for a long prompt to be read: said in its bubble until its first text (the stream's keep-alive comments while
// it waits are no event a reader sees)
const WAITING = "waiting for a free slot on the server, or for it to read the conversation…";
const HINT_AFTER_MS = 1000;

function hintWhileWaiting(out) {
  const timer = setTimeout(() => { out.dataset.hint = WAITING; }, HINT_AFTER_MS);
  return () => { clearTimeout(timer); delete out.dataset.hint; };
}

// the n tokens after those that came with the first text, over the time since it came; `total`: the reply's
// tokens so far (data-tokens, for tests)
function clearSpeed() {
  $("speed").textContent = "";
  delete $("speed").dataset.tokens;
}

function showSpeed(n, since, total) {
  const s = (performance.now() - since) / 1000;
  if (s > 0) $("speed").textContent = (n / s).toFixed(1) + " tokens/s";
  $("speed").dataset.tokens = total;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  // an Enter while an input method composes (Japanese, Chinese, Korean) picks a candidate; Safari reports
  // that keydown only by keyCode 229
  if (e.isComposing || e.keyCode === 229) return;
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  conversation += 1;
  if (controller) controller.abort();  // a reply still streaming belonged to the conversation cleared
  history.length = 0; $("log").textContent = ""; $("status").textContent = ""; clearSpeed();
  saveConversation();
});
for (const id of SETTINGS) $(id).addEventListener("input", saveSettings);
$("api-key").addEventListener("change", loadModel);
restore();
loadModel();
