import sys, time, torch
torch.ops.load_library(sys.argv[1]); torch.set_num_threads(1)
ops = torch.ops.lnsr
def T(f):
    f(); ts=[]
    for _ in range(15):
        t=time.perf_counter(); f(); f(); f(); ts.append((time.perf_counter()-t)/3*1e3)
    ts.sort(); return ts[7]
for dt in (torch.float32, torch.bfloat16, torch.float16):
    ys = [torch.randn(32, 128, 384).to(dt) for _ in range(6)]
    mask = (torch.rand(16, 128) > 0.2).float(); w = torch.ones(6)
    print(str(dt)[6:], "layer_penalty fwd 6x[32,128,384] %.3f ms" % T(lambda: ops.layer_penalty(ys, mask, w, False)))
