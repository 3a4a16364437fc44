"""``lnsr.LNSR`` stays on one screen (issue #34): what its hooks read from and do to a call lives in
``lnsr.forward``, the loss accounting in ``lnsr.loss_share``; this keeps the class from growing back."""
import inspect

import lnsr

MAX_LINES = 220


def test_lnsr_class_fits_on_one_screen():
    lines, _ = inspect.getsourcelines(lnsr.LNSR)
    assert len(lines) <= MAX_LINES, (
        f"lnsr.LNSR is {len(lines)} lines (at most {MAX_LINES}): move call handling to lnsr/forward.py, "
        f"loss accounting to lnsr/loss_share.py, or other helpers out of the class")


def test_the_names_others_import_from_lnsr_regularizer_remain():
    from lnsr import regularizer
    for name in ("LNSR", "LNSRConfig", "NORMALIZE_MODES", "gain_weights", "_draw_seed", "_fold_rank"):
        assert hasattr(regularizer, name), name
    assert regularizer.LNSR is lnsr.LNSR
