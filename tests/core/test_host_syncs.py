"""The trainer's step reads device values on the host once per SAE and optimizer step, not once per batch or
micro-batch: the losses, fired latents and variance are accumulated on the device (on a GPU each read
would stall the queue of kernels)."""

import torch

from tests.support.training import make_trainer

# What makes the host wait for the device when the tensor lives there.
READS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__float__", "__int__")


def reads_in_one_step(tmp_path, monkeypatch, **kw) -> int:
    trainer = make_trainer(tmp_path, run_name=f"run-{len(kw)}-{sorted(kw.items())}", auxk_alpha=0.0, **kw)
    trainer.fit(max_steps=1)  # the first step also sets b_dec and the input scales: not counted
    calls = []
    with monkeypatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        trainer._train_step()
    return len(calls)


def test_host_reads_do_not_grow_with_micro_batches(tmp_path, monkeypatch):
    one = reads_in_one_step(tmp_path, monkeypatch)
    assert one > 0  # the step's one read per SAE (and the LM side's own) are seen
    assert reads_in_one_step(tmp_path, monkeypatch, micro_acc_steps=4) == one
