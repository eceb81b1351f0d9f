/*
 * llama2c_ref.c: a re-implementation, written for babyllama's benchmarks, of the forward pass and
 * greedy decode loop of karpathy's llama2.c run.c (fp32) and runq.c (Q8_0). It is NOT llama2.c's own
 * source: it was written from memory of how run.c/runq.c compute, to measure our speed against theirs
 * on a machine where llama2.c is not available. Same arithmetic, same loops, same OpenMP pragmas.
 *
 * Reads babyllama's model files (docs/formats.md):
 *   version 0: llama2.c legacy fp32 (7 int32 header; negative vocab_size = unshared classifier)
 *   version 1: fp32, 256-byte "ak42" header (what llama2.c's export.py --version 1 writes)
 *   version 2: Q8_0, 256-byte header (export.py --version 2, what runq.c reads)
 * plus babyllama's header extension: float64 rope_theta at offset 48 and norm_eps at 56 (0 = defaults).
 *
 * Build: gcc -Ofast -march=native -fopenmp llama2c_ref.c -o llama2c_ref -lm
 * Usage: llama2c_ref MODEL.bin [-n STEPS] [-i token,token,...]
 *   Starts from BOS (1) followed by the prompt ids, decodes greedily (argmax) with run.c's loop, prints
 *   the generated ids (not the prompt, not a final BOS) on one line to stdout and run.c's
 *   "achieved tok/s: X" to stderr (timer started at the end of step 0, as run.c does).
 */

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x616b3432u

typedef struct {
    int dim;        // transformer dimension
    int hidden_dim; // for ffn layers
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int vocab_size;
    int seq_len;
} Config;

typedef struct {
    int8_t *q; // quantized values
    float *s;  // one scale per group
} QuantizedTensor;

typedef struct {
    // fp32 (run.c); for Q8_0 only token_embedding_table (dequantized at load) and the norms are used
    float *token_embedding_table; // (vocab_size, dim)
    float *rms_att_weight;        // (layer, dim)
    float *rms_ffn_weight;        // (layer, dim)
    float *wq;                    // (layer, dim, n_heads * head_size)
    float *wk;                    // (layer, dim, n_kv_heads * head_size)
    float *wv;                    // (layer, dim, n_kv_heads * head_size)
    float *wo;                    // (layer, n_heads * head_size, dim)
    float *w1;                    // (layer, hidden_dim, dim)
    float *w2;                    // (layer, dim, hidden_dim)
    float *w3;                    // (layer, hidden_dim, dim)
    float *rms_final_weight;      // (dim,)
    float *wcls;                  // (vocab_size, dim)
    // Q8_0 (runq.c): one QuantizedTensor per layer
    QuantizedTensor *q_tokens, *qwq, *qwk, *qwv, *qwo, *qw1, *qw2, *qw3, *qwcls;
} TransformerWeights;

typedef struct {
    float *x;      // activation at current time stamp (dim,)
    float *xb;     // same, but inside a residual branch (dim,)
    float *xb2;    // an additional buffer just for convenience (dim,)
    float *hb;     // buffer for hidden dimension in the ffn (hidden_dim,)
    float *hb2;    // buffer for hidden dimension in the ffn (hidden_dim,)
    QuantizedTensor xq; // quantized x (dim,)
    QuantizedTensor hq; // quantized hb (hidden_dim,)
    float *q;      // query (dim,)
    float *k;      // key (kv_dim,)
    float *v;      // value (kv_dim,)
    float *att;    // buffer for scores/attention values (n_heads, seq_len)
    float *logits; // output logits
    float *key_cache;   // (layer, seq_len, kv_dim)
    float *value_cache; // (layer, seq_len, kv_dim)
} RunState;

typedef struct {
    Config config;
    TransformerWeights weights;
    RunState state;
    int version;   // 0, 1 (fp32) or 2 (Q8_0)
    int shared_classifier;
    float rope_theta;
    float norm_eps;
    int fd;
    void *data;
    size_t file_size;
} Transformer;

static int GS = 0; // Q8_0 group size (global, as in runq.c)

static void die(const char *msg) {
    fprintf(stderr, "llama2c_ref: %s\n", msg);
    exit(EXIT_FAILURE);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n, size);
    if (!p) die("malloc failed");
    return p;
}

// ----------------------------------------------------------------------------
// loading

static void malloc_run_state(RunState *s, Config *p, int quantized) {
    int kv_dim = (p->dim * p->n_kv_heads) / p->n_heads;
    s->x = xcalloc(p->dim, sizeof(float));
    s->xb = xcalloc(p->dim, sizeof(float));
    s->xb2 = xcalloc(p->dim, sizeof(float));
    s->hb = xcalloc(p->hidden_dim, sizeof(float));
    s->hb2 = xcalloc(p->hidden_dim, sizeof(float));
    s->q = xcalloc(p->dim, sizeof(float));
    s->k = xcalloc(kv_dim, sizeof(float));
    s->v = xcalloc(kv_dim, sizeof(float));
    s->att = xcalloc((size_t)p->n_heads * p->seq_len, sizeof(float));
    s->logits = xcalloc(p->vocab_size, sizeof(float));
    s->key_cache = xcalloc((size_t)p->n_layers * p->seq_len * kv_dim, sizeof(float));
    s->value_cache = xcalloc((size_t)p->n_layers * p->seq_len * kv_dim, sizeof(float));
    if (quantized) {
        s->xq.q = xcalloc(p->dim, sizeof(int8_t));
        s->xq.s = xcalloc(p->dim, sizeof(float));
        s->hq.q = xcalloc(p->hidden_dim, sizeof(int8_t));
        s->hq.s = xcalloc(p->hidden_dim, sizeof(float));
    }
}

// run.c's memory_map_weights (legacy version 0 layout)
static void map_weights_v0(TransformerWeights *w, Config *p, float *ptr, int shared_weights) {
    int head_size = p->dim / p->n_heads;
    size_t n_layers = p->n_layers;
    w->token_embedding_table = ptr;
    ptr += (size_t)p->vocab_size * p->dim;
    w->rms_att_weight = ptr;
    ptr += n_layers * p->dim;
    w->wq = ptr;
    ptr += n_layers * p->dim * (p->n_heads * head_size);
    w->wk = ptr;
    ptr += n_layers * p->dim * (p->n_kv_heads * head_size);
    w->wv = ptr;
    ptr += n_layers * p->dim * (p->n_kv_heads * head_size);
    w->wo = ptr;
    ptr += n_layers * (p->n_heads * head_size) * p->dim;
    w->rms_ffn_weight = ptr;
    ptr += n_layers * p->dim;
    w->w1 = ptr;
    ptr += n_layers * p->dim * p->hidden_dim;
    w->w2 = ptr;
    ptr += n_layers * p->hidden_dim * p->dim;
    w->w3 = ptr;
    ptr += n_layers * p->dim * p->hidden_dim;
    w->rms_final_weight = ptr;
    ptr += p->dim;
    ptr += (size_t)p->seq_len * head_size / 2; // skip what used to be freq_cis_real (for RoPE)
    ptr += (size_t)p->seq_len * head_size / 2; // skip what used to be freq_cis_imag (for RoPE)
    w->wcls = shared_weights ? w->token_embedding_table : ptr;
}

// export.py's version 1 layout: the norms first, then the matrices
static void map_weights_v1(TransformerWeights *w, Config *p, float *ptr, int shared_weights) {
    int head_size = p->dim / p->n_heads;
    size_t n_layers = p->n_layers;
    w->rms_att_weight = ptr;
    ptr += n_layers * p->dim;
    w->rms_ffn_weight = ptr;
    ptr += n_layers * p->dim;
    w->rms_final_weight = ptr;
    ptr += p->dim;
    w->token_embedding_table = ptr;
    ptr += (size_t)p->vocab_size * p->dim;
    w->wq = ptr;
    ptr += n_layers * p->dim * (p->n_heads * head_size);
    w->wk = ptr;
    ptr += n_layers * p->dim * (p->n_kv_heads * head_size);
    w->wv = ptr;
    ptr += n_layers * p->dim * (p->n_kv_heads * head_size);
    w->wo = ptr;
    ptr += n_layers * (p->n_heads * head_size) * p->dim;
    w->w1 = ptr;
    ptr += n_layers * p->dim * p->hidden_dim;
    w->w2 = ptr;
    ptr += n_layers * p->hidden_dim * p->dim;
    w->w3 = ptr;
    ptr += n_layers * p->dim * p->hidden_dim;
    w->wcls = shared_weights ? w->token_embedding_table : ptr;
}

// runq.c's init_quantized_tensors: n tensors of size_each values, each its int8 values then its scales
static QuantizedTensor *init_quantized_tensors(void **ptr, int n, size_t size_each) {
    void *p = *ptr;
    QuantizedTensor *res = xcalloc(n, sizeof(QuantizedTensor));
    for (int i = 0; i < n; i++) {
        res[i].q = (int8_t *)p;
        p = (int8_t *)p + size_each;
        res[i].s = (float *)p;
        p = (float *)p + size_each / GS;
    }
    *ptr = p;
    return res;
}

static void dequantize(QuantizedTensor *qx, float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        x[i] = qx->q[i] * qx->s[i / GS];
    }
}

// runq.c's memory_map_weights (version 2)
static void map_weights_v2(TransformerWeights *w, Config *p, void *ptr, int shared_classifier) {
    int head_size = p->dim / p->n_heads;
    float *fptr = (float *)ptr;
    w->rms_att_weight = fptr;
    fptr += (size_t)p->n_layers * p->dim;
    w->rms_ffn_weight = fptr;
    fptr += (size_t)p->n_layers * p->dim;
    w->rms_final_weight = fptr;
    fptr += p->dim;

    ptr = (void *)fptr;
    w->q_tokens = init_quantized_tensors(&ptr, 1, (size_t)p->vocab_size * p->dim);
    // dequantize the token embedding table (runq.c keeps it in fp32)
    w->token_embedding_table = xcalloc((size_t)p->vocab_size * p->dim, sizeof(float));
    dequantize(w->q_tokens, w->token_embedding_table, (size_t)p->vocab_size * p->dim);

    w->qwq = init_quantized_tensors(&ptr, p->n_layers, (size_t)p->dim * (p->n_heads * head_size));
    w->qwk = init_quantized_tensors(&ptr, p->n_layers, (size_t)p->dim * (p->n_kv_heads * head_size));
    w->qwv = init_quantized_tensors(&ptr, p->n_layers, (size_t)p->dim * (p->n_kv_heads * head_size));
    w->qwo = init_quantized_tensors(&ptr, p->n_layers, (size_t)(p->n_heads * head_size) * p->dim);
    w->qw1 = init_quantized_tensors(&ptr, p->n_layers, (size_t)p->dim * p->hidden_dim);
    w->qw2 = init_quantized_tensors(&ptr, p->n_layers, (size_t)p->hidden_dim * p->dim);
    w->qw3 = init_quantized_tensors(&ptr, p->n_layers, (size_t)p->dim * p->hidden_dim);
    w->qwcls = shared_classifier ? w->q_tokens
                                 : init_quantized_tensors(&ptr, 1, (size_t)p->dim * p->vocab_size);
}

static size_t expected_size(Transformer *t, size_t header) {
    Config *p = &t->config;
    size_t L = p->n_layers, d = p->dim, h = p->hidden_dim, V = p->vocab_size;
    size_t kv = (size_t)(p->dim / p->n_heads) * p->n_kv_heads;
    size_t norms = 4 * (2 * L * d + d);
    size_t per_layer[7] = {d * d, kv * d, kv * d, d * d, h * d, d * h, h * d};
    size_t body = norms;
    if (t->version == 2) {
        size_t q8 = V * d + 4 * (V * d / GS);
        body += q8;
        for (int i = 0; i < 7; i++) body += L * (per_layer[i] + 4 * (per_layer[i] / GS));
        if (!t->shared_classifier) body += q8;
    } else {
        body += 4 * V * d;
        for (int i = 0; i < 7; i++) body += 4 * L * per_layer[i];
        if (t->version == 0) body += 4 * (size_t)p->seq_len * (d / p->n_heads);
        if (!t->shared_classifier) body += 4 * V * d;
    }
    return header + body;
}

static void build_transformer(Transformer *t, const char *checkpoint) {
    FILE *file = fopen(checkpoint, "rb");
    if (!file) {
        fprintf(stderr, "llama2c_ref: couldn't open %s: %s\n", checkpoint, strerror(errno));
        exit(EXIT_FAILURE);
    }
    unsigned char head[256] = {0};
    size_t got = fread(head, 1, sizeof(head), file);
    fseek(file, 0, SEEK_END);
    t->file_size = ftell(file);
    fclose(file);
    if (got < 28) die("file too small to be a model");

    uint32_t magic;
    memcpy(&magic, head, 4);
    size_t header;
    double theta = 0.0, eps = 0.0;
    if (magic == MAGIC) {
        if (got < 256) die("truncated 256-byte header");
        memcpy(&t->version, head + 4, 4);
        if (t->version != 1 && t->version != 2) die("unsupported version (reads 0, 1 and 2)");
        memcpy(&t->config, head + 8, sizeof(Config));
        t->shared_classifier = head[36] != 0;
        if (t->version == 2) memcpy(&GS, head + 37, 4);
        memcpy(&theta, head + 48, 8); // babyllama extension; 0 means the Llama 2 default
        memcpy(&eps, head + 56, 8);
        header = 256;
    } else {
        t->version = 0;
        memcpy(&t->config, head, sizeof(Config));
        // run.c: negative vocab size is a hacky way of signaling unshared weights
        t->shared_classifier = t->config.vocab_size > 0;
        t->config.vocab_size = abs(t->config.vocab_size);
        header = sizeof(Config);
    }
    Config *p = &t->config;
    if (p->dim <= 0 || p->hidden_dim <= 0 || p->n_layers <= 0 || p->n_heads <= 0 || p->n_kv_heads <= 0 ||
        p->vocab_size <= 0 || p->seq_len <= 0 || p->dim % p->n_heads || p->n_heads % p->n_kv_heads)
        die("bad header");
    if (t->version == 2 && (GS <= 0 || p->dim % GS || p->hidden_dim % GS))
        die("bad Q8_0 group size");
    t->rope_theta = theta > 0 ? (float)theta : 10000.0f;
    t->norm_eps = eps > 0 ? (float)eps : 1e-5f;
    if (t->file_size != expected_size(t, header)) die("file size does not match its header");

    // memory map the weights into the data pointer, as run.c does
    t->fd = open(checkpoint, O_RDONLY);
    if (t->fd == -1) die("open failed");
    t->data = mmap(NULL, t->file_size, PROT_READ, MAP_PRIVATE, t->fd, 0);
    if (t->data == MAP_FAILED) die("mmap failed");
    void *weights_ptr = (char *)t->data + header;
    if (t->version == 0) map_weights_v0(&t->weights, p, (float *)weights_ptr, t->shared_classifier);
    else if (t->version == 1) map_weights_v1(&t->weights, p, (float *)weights_ptr, t->shared_classifier);
    else map_weights_v2(&t->weights, p, weights_ptr, t->shared_classifier);
    malloc_run_state(&t->state, p, t->version == 2);
}

// ----------------------------------------------------------------------------
// neural net blocks, as in run.c / runq.c

static void rmsnorm(float *o, float *x, float *weight, int size, float eps) {
    // calculate sum of squares
    float ss = 0.0f;
    for (int j = 0; j < size; j++) {
        ss += x[j] * x[j];
    }
    ss /= size;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    // normalize and scale
    for (int j = 0; j < size; j++) {
        o[j] = weight[j] * (ss * x[j]);
    }
}

static void softmax(float *x, int size) {
    // find max value (for numerical stability)
    float max_val = x[0];
    for (int i = 1; i < size; i++) {
        if (x[i] > max_val) {
            max_val = x[i];
        }
    }
    // exp and sum
    float sum = 0.0f;
    for (int i = 0; i < size; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    // normalize
    for (int i = 0; i < size; i++) {
        x[i] /= sum;
    }
}

// run.c: W (d,n) @ x (n,) -> xout (d,)
static void matmul(float *xout, float *x, float *w, int n, int d) {
    int i;
#pragma omp parallel for private(i)
    for (i = 0; i < d; i++) {
        float val = 0.0f;
        for (int j = 0; j < n; j++) {
            val += w[(size_t)i * n + j] * x[j];
        }
        xout[i] = val;
    }
}

// runq.c: symmetric int8 per group of GS
static void quantize(QuantizedTensor *qx, float *x, int n) {
    int num_groups = n / GS;
    float Q_MAX = 127.0f;

    for (int group = 0; group < num_groups; group++) {
        // find the max absolute value in the current group
        float wmax = 0.0;
        for (int i = 0; i < GS; i++) {
            float val = fabs(x[group * GS + i]);
            if (val > wmax) {
                wmax = val;
            }
        }
        // calculate and write the scaling factor
        float scale = wmax / Q_MAX;
        qx->s[group] = scale;
        // calculate and write the quantized values
        for (int i = 0; i < GS; i++) {
            float quant_value = x[group * GS + i] / scale; // scale
            int8_t quantized = (int8_t)round(quant_value); // round and clamp
            qx->q[group * GS + i] = quantized;
        }
    }
}

// runq.c: W (d,n) @ x (n,) -> xout (d,), both quantized; integer dot per group, scaled per group
static void matmul_q8(float *xout, QuantizedTensor *x, QuantizedTensor *w, int n, int d) {
    int i;
#pragma omp parallel for private(i)
    for (i = 0; i < d; i++) {
        float val = 0.0f;
        int32_t ival = 0;
        size_t in = (size_t)i * n;
        // do the matmul in groups of GS
        int j;
        for (j = 0; j <= n - GS; j += GS) {
            for (int k = 0; k < GS; k++) {
                ival += ((int32_t)x->q[j + k]) * ((int32_t)w->q[in + j + k]);
            }
            val += ((float)ival) * w->s[(in + j) / GS] * x->s[j / GS];
            ival = 0;
        }
        xout[i] = val;
    }
}

// RoPE relative positional encoding: complex-valued rotate q and k in each head (run.c's loop)
static void rope(Transformer *t, int pos) {
    Config *p = &t->config;
    RunState *s = &t->state;
    int dim = p->dim;
    int head_size = dim / p->n_heads;
    int kv_dim = (p->dim * p->n_kv_heads) / p->n_heads;
    for (int i = 0; i < dim; i += 2) {
        int head_dim = i % head_size;
        float freq = 1.0f / powf(t->rope_theta, head_dim / (float)head_size);
        float val = pos * freq;
        float fcr = cosf(val);
        float fci = sinf(val);
        int rotn = i < kv_dim ? 2 : 1; // how many vectors? 2 = q & k, 1 = q only
        for (int v = 0; v < rotn; v++) {
            float *vec = v == 0 ? s->q : s->k; // the vector to rotate (query or key)
            float v0 = vec[i];
            float v1 = vec[i + 1];
            vec[i] = v0 * fcr - v1 * fci;
            vec[i + 1] = v0 * fci + v1 * fcr;
        }
    }
}

// multihead attention over the cache of layer `loff`, iterating over all heads in parallel
static void attention(Transformer *t, size_t loff, int pos) {
    Config *p = &t->config;
    RunState *s = &t->state;
    int dim = p->dim;
    int kv_dim = (p->dim * p->n_kv_heads) / p->n_heads;
    int kv_mul = p->n_heads / p->n_kv_heads; // integer multiplier of the kv sharing in multiquery
    int head_size = dim / p->n_heads;
    int h;
#pragma omp parallel for private(h)
    for (h = 0; h < p->n_heads; h++) {
        // get the query vector for this head
        float *q = s->q + h * head_size;
        // attention scores for this head
        float *att = s->att + (size_t)h * p->seq_len;
        // iterate over all timesteps, including the current one
        for (int t2 = 0; t2 <= pos; t2++) {
            // get the key vector for this head and at this timestep
            float *k = s->key_cache + loff + (size_t)t2 * kv_dim + (h / kv_mul) * head_size;
            // calculate the attention score as the dot product of q and k
            float score = 0.0f;
            for (int i = 0; i < head_size; i++) {
                score += q[i] * k[i];
            }
            score /= sqrtf(head_size);
            // save the score to the attention buffer
            att[t2] = score;
        }
        // softmax the scores to get attention weights, from 0..pos inclusively
        softmax(att, pos + 1);
        // weighted sum of the values, store back into xb
        float *xb = s->xb + h * head_size;
        memset(xb, 0, head_size * sizeof(float));
        for (int t2 = 0; t2 <= pos; t2++) {
            float *v = s->value_cache + loff + (size_t)t2 * kv_dim + (h / kv_mul) * head_size;
            float a = att[t2];
            for (int i = 0; i < head_size; i++) {
                xb[i] += a * v[i];
            }
        }
    }
}

// run.c's forward (fp32)
static float *forward_fp32(Transformer *transformer, int token, int pos) {
    Config *p = &transformer->config;
    TransformerWeights *w = &transformer->weights;
    RunState *s = &transformer->state;
    float *x = s->x;
    int dim = p->dim;
    int kv_dim = (p->dim * p->n_kv_heads) / p->n_heads;
    int hidden_dim = p->hidden_dim;
    float eps = transformer->norm_eps;

    // copy the token embedding into x
    float *content_row = w->token_embedding_table + (size_t)token * dim;
    memcpy(x, content_row, dim * sizeof(*x));

    // forward all the layers
    for (size_t l = 0; l < (size_t)p->n_layers; l++) {
        // attention rmsnorm
        rmsnorm(s->xb, x, w->rms_att_weight + l * dim, dim, eps);

        // key and value point to the kv cache
        size_t loff = l * p->seq_len * kv_dim; // kv cache layer offset for convenience
        s->k = s->key_cache + loff + (size_t)pos * kv_dim;
        s->v = s->value_cache + loff + (size_t)pos * kv_dim;

        // qkv matmuls for this position
        matmul(s->q, s->xb, w->wq + l * dim * dim, dim, dim);
        matmul(s->k, s->xb, w->wk + l * dim * kv_dim, dim, kv_dim);
        matmul(s->v, s->xb, w->wv + l * dim * kv_dim, dim, kv_dim);

        rope(transformer, pos);
        attention(transformer, loff, pos);

        // final matmul to get the output of the attention
        matmul(s->xb2, s->xb, w->wo + l * dim * dim, dim, dim);

        // residual connection back into x
        for (int i = 0; i < dim; i++) {
            x[i] += s->xb2[i];
        }

        // ffn rmsnorm
        rmsnorm(s->xb, x, w->rms_ffn_weight + l * dim, dim, eps);

        // Now for FFN in PyTorch we have: self.w2(F.silu(self.w1(x)) * self.w3(x))
        matmul(s->hb, s->xb, w->w1 + l * dim * hidden_dim, dim, hidden_dim);
        matmul(s->hb2, s->xb, w->w3 + l * dim * hidden_dim, dim, hidden_dim);

        // SwiGLU non-linearity
        for (int i = 0; i < hidden_dim; i++) {
            float val = s->hb[i];
            // silu(x)=x*σ(x), where σ(x) is the logistic sigmoid
            val *= (1.0f / (1.0f + expf(-val)));
            // elementwise multiply with w3(x)
            val *= s->hb2[i];
            s->hb[i] = val;
        }

        // final matmul to get the output of the ffn
        matmul(s->xb, s->hb, w->w2 + l * dim * hidden_dim, hidden_dim, dim);

        // residual connection
        for (int i = 0; i < dim; i++) {
            x[i] += s->xb[i];
        }
    }

    // final rmsnorm
    rmsnorm(x, x, w->rms_final_weight, dim, eps);

    // classifier into logits
    matmul(s->logits, x, w->wcls, p->dim, p->vocab_size);
    return s->logits;
}

// runq.c's forward (Q8_0 matrices, fp32 everything else)
static float *forward_q8(Transformer *transformer, int token, int pos) {
    Config *p = &transformer->config;
    TransformerWeights *w = &transformer->weights;
    RunState *s = &transformer->state;
    float *x = s->x;
    int dim = p->dim;
    int kv_dim = (p->dim * p->n_kv_heads) / p->n_heads;
    int hidden_dim = p->hidden_dim;
    float eps = transformer->norm_eps;

    // copy the token embedding into x
    memcpy(x, w->token_embedding_table + (size_t)token * dim, dim * sizeof(float));

    // forward all the layers
    for (int l = 0; l < p->n_layers; l++) {
        // attention rmsnorm
        rmsnorm(s->xb, x, w->rms_att_weight + (size_t)l * dim, dim, eps);

        // qkv matmuls for this position
        quantize(&s->xq, s->xb, dim);
        matmul_q8(s->q, &s->xq, w->qwq + l, dim, dim);
        matmul_q8(s->k, &s->xq, w->qwk + l, dim, kv_dim);
        matmul_q8(s->v, &s->xq, w->qwv + l, dim, kv_dim);

        rope(transformer, pos);

        // save key,value at this time step (pos) to our kv cache
        size_t loff = (size_t)l * p->seq_len * kv_dim; // kv cache layer offset for convenience
        float *key_cache_row = s->key_cache + loff + (size_t)pos * kv_dim;
        float *value_cache_row = s->value_cache + loff + (size_t)pos * kv_dim;
        memcpy(key_cache_row, s->k, kv_dim * sizeof(*key_cache_row));
        memcpy(value_cache_row, s->v, kv_dim * sizeof(*value_cache_row));

        attention(transformer, loff, pos);

        // final matmul to get the output of the attention
        quantize(&s->xq, s->xb, dim);
        matmul_q8(s->xb2, &s->xq, w->qwo + l, dim, dim);

        // residual connection back into x
        for (int i = 0; i < dim; i++) {
            x[i] += s->xb2[i];
        }

        // ffn rmsnorm
        rmsnorm(s->xb, x, w->rms_ffn_weight + (size_t)l * dim, dim, eps);

        // Now for FFN in PyTorch we have: self.w2(F.silu(self.w1(x)) * self.w3(x))
        quantize(&s->xq, s->xb, dim);
        matmul_q8(s->hb, &s->xq, w->qw1 + l, dim, hidden_dim);
        matmul_q8(s->hb2, &s->xq, w->qw3 + l, dim, hidden_dim);

        // SwiGLU non-linearity
        for (int i = 0; i < hidden_dim; i++) {
            float val = s->hb[i];
            val *= (1.0f / (1.0f + expf(-val)));
            val *= s->hb2[i];
            s->hb[i] = val;
        }

        // final matmul to get the output of the ffn
        quantize(&s->hq, s->hb, hidden_dim);
        matmul_q8(s->xb, &s->hq, w->qw2 + l, hidden_dim, dim);

        // residual connection
        for (int i = 0; i < dim; i++) {
            x[i] += s->xb[i];
        }
    }

    // final rmsnorm
    rmsnorm(x, x, w->rms_final_weight, dim, eps);

    // classifier into logits
    quantize(&s->xq, x, dim);
    matmul_q8(s->logits, &s->xq, w->qwcls, dim, p->vocab_size);
    return s->logits;
}

static float *forward(Transformer *t, int token, int pos) {
    return t->version == 2 ? forward_q8(t, token, pos) : forward_fp32(t, token, pos);
}

// ----------------------------------------------------------------------------
// greedy decoding, run.c's generate loop (temperature 0: sample_argmax)

static int sample_argmax(float *probabilities, int n) {
    // return the index that has the highest probability
    int max_i = 0;
    float max_p = probabilities[0];
    for (int i = 1; i < n; i++) {
        if (probabilities[i] > max_p) {
            max_i = i;
            max_p = probabilities[i];
        }
    }
    return max_i;
}

static double time_in_ms(void) {
    // run.c uses a millisecond clock (CLOCK_REALTIME, whole ms); a finer monotonic clock here,
    // the same measurement window
    struct timespec time;
    clock_gettime(CLOCK_MONOTONIC, &time);
    return time.tv_sec * 1000.0 + time.tv_nsec / 1e6;
}

static void generate(Transformer *transformer, int *prompt_tokens, int num_prompt_tokens, int steps) {
    double start = 0; // used to time our code, only initialized after first iteration
    int next;         // will store the next token in the sequence
    int token = prompt_tokens[0]; // kick off with the first token in the prompt
    int pos = 0;                  // position in the sequence
    int printed = 0;
    while (pos < steps) {
        // forward the transformer to get logits for the next token
        float *logits = forward(transformer, token, pos);

        // advance the state machine
        if (pos < num_prompt_tokens - 1) {
            // if we are still processing the input prompt, force the next prompt token
            next = prompt_tokens[pos + 1];
        } else {
            // otherwise sample the next token from the logits
            next = sample_argmax(logits, transformer->config.vocab_size);
        }
        pos++;

        // data-dependent terminating condition: the BOS (=1) token delimits sequences
        if (next == 1) {
            break;
        }

        // run.c prints the decoded piece here; we print the id of each generated token
        if (pos >= num_prompt_tokens) {
            printf(printed++ ? " %d" : "%d", next);
            fflush(stdout);
        }
        token = next;

        // init the timer here because the first iteration can be slower
        if (start == 0) {
            start = time_in_ms();
        }
    }
    printf("\n");
    fflush(stdout);

    // report achieved tok/s (pos-1 because the timer starts after first iteration)
    if (pos > 1) {
        double end = time_in_ms();
        fprintf(stderr, "achieved tok/s: %f\n", (pos - 1) / (end - start) * 1000);
    }
}

static void error_usage(void) {
    fprintf(stderr, "Usage:   llama2c_ref MODEL.bin [-n STEPS] [-i token,token,...] [-z TOKENIZER] [-t 0]\n");
    fprintf(stderr, "  -n <int>    number of steps (positions, BOS and prompt included), default 256,\n");
    fprintf(stderr, "              0 or more than seq_len = seq_len\n");
    fprintf(stderr, "  -i <ids>    prompt token ids after BOS, comma separated; text that is not a list of ids\n");
    fprintf(stderr, "              means its bytes as byte-fallback tokens (byte + 3)\n");
    fprintf(stderr, "  -z, -t      run.c's flags, accepted so that it runs with run.c's command line: no tokenizer\n");
    fprintf(stderr, "              is read, and decoding is greedy (-t must be 0)\n");
    exit(EXIT_FAILURE);
}

int main(int argc, char *argv[]) {
    if (argc < 2) error_usage();
    const char *checkpoint_path = argv[1];
    int steps = 256;
    const char *prompt = NULL;
    for (int i = 2; i < argc; i += 2) {
        if (i + 1 >= argc || argv[i][0] != '-' || strlen(argv[i]) != 2) error_usage();
        if (argv[i][1] == 'n') steps = atoi(argv[i + 1]);
        else if (argv[i][1] == 'i') prompt = argv[i + 1];
        else if (argv[i][1] == 'z') continue;
        else if (argv[i][1] == 't') { if (atof(argv[i + 1]) != 0.0) die("only greedy decoding (-t 0)"); }
        else error_usage();
    }
    if (steps < 0) steps = 0;

    Transformer transformer;
    memset(&transformer, 0, sizeof(transformer));
    build_transformer(&transformer, checkpoint_path);
    Config *p = &transformer.config;
    if (steps == 0 || steps > p->seq_len) steps = p->seq_len; // override to ~max length

    // prompt: BOS, then the given ids
    int cap = 1 + (prompt ? (int)strlen(prompt) : 0);
    int *prompt_tokens = xcalloc(cap, sizeof(int));
    int num_prompt_tokens = 0;
    prompt_tokens[num_prompt_tokens++] = 1;
    int text = 0;
    for (const char *c = prompt ? prompt : ""; *c; c++)
        if (!(*c == ',' || (*c >= '0' && *c <= '9'))) text = 1;
    if (text) {
        for (const unsigned char *c = (const unsigned char *)prompt; *c; c++) {
            if (*c + 3 >= p->vocab_size) die("prompt byte outside the vocabulary");
            prompt_tokens[num_prompt_tokens++] = *c + 3;
        }
    } else if (prompt && *prompt) {
        const char *c = prompt;
        while (*c) {
            char *end;
            long id = strtol(c, &end, 10);
            if (end == c || id < 0 || id >= p->vocab_size) die("bad prompt token id");
            prompt_tokens[num_prompt_tokens++] = (int)id;
            c = end;
            if (*c == ',') c++;
            else if (*c) die("bad prompt token list (expected comma-separated ids)");
        }
    }

    generate(&transformer, prompt_tokens, num_prompt_tokens, steps);
    free(prompt_tokens);
    munmap(transformer.data, transformer.file_size);
    close(transformer.fd);
    return 0;
}
