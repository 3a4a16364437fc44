"""lnsr finetune's model load: transformers' load report table for the new head becomes one line."""
import pytest
import torch

transformers = pytest.importorskip("transformers")


def test_new_head_is_one_line_and_weights_load(tmp_path, capfd):
    from lnsr.finetune.runner import load_pretrained

    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)
    base.save_pretrained(tmp_path)          # an encoder without a classification head, as a hub checkpoint
    lines = []
    before = transformers.utils.logging.get_verbosity()
    model = load_pretrained(transformers.BertForSequenceClassification, str(tmp_path), log=lines.append,
                            num_labels=2)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err
    assert len(lines) == 1 and "newly initialised classifier" in lines[0], lines
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    assert transformers.utils.logging.get_verbosity() == before   # the caller's verbosity is restored


def test_missing_folder_is_one_clear_error(tmp_path):
    from lnsr.finetune.runner import load_pretrained

    with pytest.raises(SystemExit, match="could not load .* pass --model"):
        load_pretrained(transformers.BertForSequenceClassification, str(tmp_path / "nope"))
