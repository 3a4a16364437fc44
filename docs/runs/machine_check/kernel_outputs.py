"""Outputs of the lnsr._C CPU ops (perturb, perturb_backward, layer_penalty and its backward; fp32 and
bf16) on fixed random inputs, from the library given as argv[1], saved to argv[2]; run once per build
and compare the two files with torch.equal (see README.md here)."""
import sys, torch
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
out = {}
ops = torch.ops.lnsr
for dt in (torch.float32, torch.bfloat16):
    h = torch.randn(16, 77, 384, generator=g).to(dt)
    for kind in ("gaussian", "relative"):
        out[f"perturb_{dt}_{kind}"] = ops.perturb(h, 123456789, 0.05, kind)
    gg = torch.randn(32, 77, 384, generator=g).to(dt)
    out[f"perturb_bwd_{dt}"] = ops.perturb_backward(gg)
    ys = [torch.randn(32, 77, 384, generator=g).to(dt) for _ in range(6)]
    mask = (torch.rand(16, 77, generator=g) > 0.3).float()
    w = torch.rand(6, generator=g)
    for dc in (False, True):
        loss, count = ops.layer_penalty(ys, mask, w, dc)
        out[f"pen_{dt}_{dc}"] = torch.stack([loss, count])
        for j, gy in enumerate(ops.layer_penalty_backward(torch.tensor(0.7), count, ys, mask, w, dc)):
            out[f"penbwd_{dt}_{dc}_{j}"] = gy
torch.save(out, sys.argv[2])
