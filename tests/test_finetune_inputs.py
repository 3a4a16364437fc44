"""lnsr finetune's inputs: the load report of the new head is one line; a GLUE task's --eval-file is read by its extension."""
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


def test_eval_file_of_a_glue_task_is_read_by_its_extension(tmp_path):
    """`--task sst2 --eval-file long=x.csv` reads a CSV (it was parsed as GLUE TSV and rejected)."""
    from lnsr.data.glue import get_task, read_eval_file

    spec = get_task("sst2")
    (tmp_path / "x.csv").write_text('sentence,label\n"a fine, warm film",1\nbad,0\n')
    assert read_eval_file(spec, str(tmp_path / "x.csv")) == [("a fine, warm film", None, 1), ("bad", None, 0)]
    (tmp_path / "x.tsv").write_text("sentence\tlabel\na fine, warm film\t1\n")
    assert read_eval_file(spec, str(tmp_path / "x.tsv")) == [("a fine, warm film", None, 1)]
    (tmp_path / "y.jsonl").write_text('{"text": "no label column"}\n')
    with pytest.raises(SystemExit, match=r"missing column\(s\) \['sentence', 'label'\]"):
        read_eval_file(spec, str(tmp_path / "y.jsonl"))
