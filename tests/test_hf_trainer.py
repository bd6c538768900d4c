"""HF Trainer trains a model loaded with quantization_config=QGaLoreQuantizationConfig as full-parameter training:
gradient accumulation, checkpoint folders, and resume that continues exactly where an uninterrupted run goes."""

import pytest
import torch
import transformers
from torch.utils.data import Dataset

import qgalore_fx
from conftest import tiny_llama

ACCUMULATION = 2


class Tokens(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(rank=8, update_interval=2))


def _trainer(model, out, steps, save_steps=None):
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=ACCUMULATION)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=ACCUMULATION,
        max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        seed=0, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched)), opt


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    tiny_llama().save_pretrained(path)
    return path


def test_trainer_trains_and_resumes_exactly(plain_dir, tmp_path):
    whole = _load(plain_dir)
    trainer, opt = _trainer(whole, tmp_path / "whole", steps=6)
    trainer.train()
    assert trainer.state.global_step == 6
    assert {s["step"] for s in opt.layer_stats().values()} == {6}  # one update per optimizer step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))

    first = _load(plain_dir)
    trainer, _ = _trainer(first, tmp_path / "run", steps=6, save_steps=3)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()

    resumed = _load(plain_dir)  # a fresh process would do the same: load, then resume from the folder
    trainer, opt = _trainer(resumed, tmp_path / "run", steps=6, save_steps=3)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    expected, got = whole.state_dict(), resumed.state_dict()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, differ[:5]


def test_trainer_checkpoint_folder_reloads_with_from_pretrained(plain_dir, tmp_path):
    model = _load(plain_dir)
    trainer, _ = _trainer(model, tmp_path, steps=2, save_steps=2)
    trainer.train()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
