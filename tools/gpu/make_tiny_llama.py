"""Write a small Llama model folder (config + trained BPE tokenizer, NO weights by default).

Use it with vLLM's load_format="dummy" (random weights), so nothing big has to
travel to the GPU machine:
    python3 make_tiny_llama.py /tmp/tinyllama [--layers 16 --hidden 2048]
Needs only `tokenizers` (present on the device image).

With --weights-seed N it also writes model.safetensors: random weights drawn from a fixed
seed on the CPU (the same bytes on every machine), scaled so that greedy decoding has clear
winners (top-2 logit gaps of about one logit, unlike vLLM's dummy +-1e-3 weights, where every
token is a near-tie). Any engine then loads real weights (no load_format needed), so a
monolithic engine and pdserve's engines compute the same model. --vocab 0 = the trained
tokenizer's size (every token id the model can emit decodes). Needs torch + safetensors.
"""

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

WORDS = ("the quick brown fox jumps over lazy dog prefill decode cluster serve "
         "request token cache model engine replica batch latency throughput "
         "hello world once upon a time there was a small llama").split()
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000, help="0 = the trained tokenizer's size")
    ap.add_argument("--max-pos", type=int, default=8192)
    ap.add_argument("--weights-seed", type=int, default=None, help="also write seeded random weights")
    ap.add_argument("--dtype", default="bfloat16")
    return ap.parse_args()


def write_tokenizer(out: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(400)]
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 1 << 20,
                   "chat_template": CHAT_TEMPLATE}, f, indent=1)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    return tok


def write_config(a: argparse.Namespace) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a.hidden, "intermediate_size": a.hidden * 4,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "head_dim": a.hidden // a.heads,
        "vocab_size": a.vocab, "max_position_embeddings": a.max_pos,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": a.dtype, "dtype": a.dtype,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def write_weights(a: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(a.weights_seed)
    dtype = getattr(torch, a.dtype)
    h, ff, hd = a.hidden, a.hidden * 4, a.hidden // a.heads

    def w(rows: int, cols: int, gain: float = 1.0) -> torch.Tensor:
        # N(0, gain^2 / fan_in): activations stay O(1) through the stack
        return (torch.randn(rows, cols, generator=g) * gain / cols**0.5).to(dtype)

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=dtype)

    sd = {"model.embed_tokens.weight": w(a.vocab, h, h**0.5), "model.norm.weight": ones(),
          "lm_head.weight": w(a.vocab, h, 3.0)}  # logits of std ~3: clear greedy winners
    for i in range(a.layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": w(a.heads * hd, h), p + "self_attn.k_proj.weight": w(a.kv_heads * hd, h),
            p + "self_attn.v_proj.weight": w(a.kv_heads * hd, h), p + "self_attn.o_proj.weight": w(h, a.heads * hd),
            p + "mlp.gate_proj.weight": w(ff, h), p + "mlp.up_proj.weight": w(ff, h),
            p + "mlp.down_proj.weight": w(h, ff),
            p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
        }
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in sd.values())


def main() -> None:
    a = parse_args()
    os.makedirs(a.out, exist_ok=True)
    tok = write_tokenizer(a.out)
    if a.vocab == 0:
        a.vocab = tok.get_vocab_size()
    write_config(a)
    n = a.vocab * a.hidden * 2 + a.layers * (
        a.hidden * a.hidden * (2 + 2 * a.kv_heads / a.heads) + 3 * a.hidden * a.hidden * 4)
    print(f"wrote {a.out} params ~{n / 1e9:.2f}B vocab {a.vocab}")
    if a.weights_seed is not None:
        print(f"weights: seed {a.weights_seed}, {write_weights(a)} params, {a.dtype}")


if __name__ == "__main__":
    main()
