"""What several test modules share: a small DeepSeek-V3 configuration and a saved checkpoint of it."""

import torch

import r1kit.model as M
from r1kit import config as C
from r1kit import tokenizer as T
from r1kit.pretrain import documents

SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
             num_attention_heads=2, n_routed_experts=4, num_hidden_layers=2)


def small_checkpoint(path):
    """A random SMALL model with a BPE tokenizer trained on addition problems, saved at `path`."""
    tok = T.train_bpe(documents("addition?digits=3&size=300"), vocab_size=300)
    cfg = C.tiny(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, max_position_embeddings=256, **SMALL)
    torch.manual_seed(0)
    M.save(M.build(cfg), path, tokenizer=tok)
    return path
