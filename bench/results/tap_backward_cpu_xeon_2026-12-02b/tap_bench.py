"""One layer's streaming-penalty backward on the CPU: the torch reference vs lnsr._C's fused op,
interleaved rep by rep (lnsr.utils.machine.interleaved_ms), one torch thread."""
import subprocess, sys, datetime, platform
import torch, lnsr
from lnsr.ops import reference as R
from lnsr.utils.machine import interleaved_ms
torch.set_num_threads(1)
be = lnsr.ops.resolve_backend("cpu", "cpu")
print("date", datetime.datetime.utcnow().isoformat(timespec="minutes"), "torch", torch.__version__, "commit",
      subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
print("shape,dtype,ms_reference,ms_fused,speedup")
for B, T, H in ((4, 8, 64), (16, 128, 384), (8, 128, 768)):
    for dt in (torch.float32, torch.bfloat16):
        y = torch.randn(2 * B, T, H).to(dt); g = torch.randn(2 * B, T, H).to(dt)
        mask = (torch.rand(B, T) > 0.2).float(); c = torch.tensor(0.3)
        res = interleaved_ms({"ref": lambda: R.penalty_tap_backward(g, c, y, 0, mask, False),
                              "fused": lambda: be.penalty_tap_backward(g, c, y, 0, mask, False)}, 31)
        r, f = res["ref"][0], res["fused"][0]
        print(f"{2*B}x{T}x{H},{str(dt)[6:]},{r:.4f},{f:.4f},{r/f:.2f}", flush=True)
