// Logits of a GGUF model from llama.cpp itself: the consumer check of tests/export/test_gguf_llamacpp.py.
// usage: llamacpp_logits MODEL.gguf IDS.i32 OUT.f32
//   IDS: int32 n_seq, int32 seq_len, then n_seq * seq_len token ids; OUT: float32 [n_seq, seq_len, n_vocab].
// Each sequence is decoded on its own (memory cleared in between) as one batch with logits for every position;
// F32 KV cache, flash attention off, one thread: what is compared is the model's arithmetic only.
#include "llama.h"

#include "ggml.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// Debugging aid: LLAMA_DUMP=<tensor name> appends that graph tensor (f32) to LLAMA_DUMP_FILE at every decode.
static bool dump_cb(struct ggml_tensor * t, bool ask, void *) {
    const char * want = getenv("LLAMA_DUMP");
    if (!want || strcmp(t->name, want) != 0 || t->type != GGML_TYPE_F32) {
        return false;
    }
    if (ask) {
        return true;
    }
    FILE * f = fopen(getenv("LLAMA_DUMP_FILE"), "ab");
    fwrite(t->data, sizeof(float), ggml_nelements(t), f);
    fclose(f);
    return true;
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS.i32 OUT.f32\n", argv[0]);
        return 2;
    }
    FILE * fi = fopen(argv[2], "rb");
    if (!fi) { perror(argv[2]); return 2; }
    int32_t n_seq = 0, len = 0;
    if (fread(&n_seq, 4, 1, fi) != 1 || fread(&len, 4, 1, fi) != 1 || n_seq <= 0 || len <= 0) {
        fprintf(stderr, "bad ids file\n");
        return 2;
    }
    std::vector<llama_token> ids((size_t) n_seq * len);
    if (fread(ids.data(), 4, ids.size(), fi) != ids.size()) { fprintf(stderr, "short ids file\n"); return 2; }
    fclose(fi);

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "failed to load %s\n", argv[1]); return 1; }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = len < 64 ? 64 : len;
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_seq_max = 1;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.swa_full = true;
    cp.no_perf = true;
    if (getenv("LLAMA_DUMP")) {
        cp.cb_eval = dump_cb;
        cp.cb_eval_user_data = nullptr;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "failed to create context\n"); return 1; }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * fo = fopen(argv[3], "wb");
    llama_batch batch = llama_batch_init(len, 0, 1);
    for (int s = 0; s < n_seq; s++) {
        llama_memory_clear(llama_get_memory(ctx), true);
        for (int i = 0; i < len; i++) {
            batch.token[i] = ids[(size_t) s * len + i];
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        batch.n_tokens = len;
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
        for (int i = 0; i < len; i++) {
            fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, fo);
        }
    }
    fclose(fo);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
