"""Which tokens the SAEs never see (training and evaluation share the rule): BOS, and pad only when it is
not the EOS token that separates documents."""

import warnings

import pytest

from sae_core import SaeConfig, SaeTrainer, TrainConfig
from sae_core.models import special_token_ids
from tests.support.tiny import tiny_model, tiny_tokenizer
from tests.support.training import make_trainer, token_data


def test_pad_is_excluded_only_when_it_is_not_eos():
    tokenizer = tiny_tokenizer()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert len({bos, eos, pad}) == 3
    assert special_token_ids(tokenizer) == sorted([bos, pad])
    tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2 ships, and as many users set it
    assert special_token_ids(tokenizer) == [bos]
    tokenizer.pad_token = None
    assert special_token_ids(tokenizer) == [bos]


class PadIsEos:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1


def test_document_separators_train_the_saes_when_pad_is_eos(tmp_path):
    data = token_data()
    data[:, 5] = 1  # an EOS (= pad) in every row: a document boundary inside packed rows
    trainer = SaeTrainer(
        TrainConfig(SaeConfig(expansion_factor=4, k=4), batch_size=4, save_dir=str(tmp_path)),
        data,
        tiny_model(),
        tokenizer=PadIsEos(),
        progress=False,
    )
    assert trainer.excluded_token_ids.tolist() == [0]
    assert trainer.fit(max_steps=1) and trainer.tokens_seen == 4 * 15  # only BOS left out


def test_no_tokenizer_and_no_exclude_tokens_warns_in_one_line(tmp_path):
    cfg = TrainConfig(SaeConfig(expansion_factor=4, k=4), batch_size=4, save_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="every token trains the SAEs") as caught:
        trainer = SaeTrainer(cfg, token_data(), tiny_model(), progress=False)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert trainer.excluded_token_ids.numel() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path, run_name="with_tokenizer")
        cfg.exclude_tokens = []
        SaeTrainer(cfg, token_data(), tiny_model(), progress=False)
