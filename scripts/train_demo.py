"""Train the demo model: a small Llama that has really learned something, so that its text is
recognizable and quantization error shows in its perplexity (random weights show neither).

    python scripts/train_demo.py --out src/mdi_mpi/demo_model [--minutes 4] [--threads 2]

The corpus is the Python standard library's own source, which every Python install has: the
``.py`` files under ``sysconfig``'s ``stdlib`` path in sorted order, the last ``HELD_OUT`` of them
kept out of training for evaluation (``mdi_mpi.demo.held_out_text``). A byte-level BPE tokenizer of
2048 tokens is trained on it, then a 4-layer Llama (hidden 256, GQA 4/2 heads) for a fixed number of
steps with AdamW, and saved in bfloat16 with the tokenizer and a chat template. The result is
shipped in the package (a few MB), so that every node of a cluster has the very same weights.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mdi_mpi.demo import CHAT_TEMPLATE, TRAINED_CONFIG, corpus_files  # noqa: E402

SEQ = 128
BATCH = 16


def train_tokenizer(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write the checkpoint to")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    files, _ = corpus_files()
    tokenizer = train_tokenizer(files, TRAINED_CONFIG["vocab_size"])
    ids = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False) + [2]
    data = torch.tensor(ids, dtype=torch.long)
    print(f"{len(files)} files, {len(data)} tokens", flush=True)
    model = LlamaForCausalLM(LlamaConfig(**TRAINED_CONFIG)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=g)
        batch = torch.stack([data[s : s + SEQ] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f} s", flush=True)
    out = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
