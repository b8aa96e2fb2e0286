"""The CPU measurement behind the ``pixel`` backend's objective (README, "Why flow matching").

ε-diffusion (cosine schedule, DPM-Solver++ sampling) vs conditional flow matching (torchcfm
I-CFM, σ = 0, Euler sampling with torchdiffeq): the same 1.07M-parameter class-conditional
UNet (the quick profile's), the same data (200 real CIFAR-10 training images per class), the
same steps, batch 32, lr 2e-4, label dropout 0.1, no EMA; then 300 samples (30 per class)
with guidance 2 at 10 and 20 solver steps (two network evaluations each), scored with the
quick profile's judge (FD-judge to 100 real test images per class, judge accuracy).
Kept as it was run for the README's numbers:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/compare_pixel_objectives.py ddpm 600
    OMP_NUM_THREADS=1 .venv/bin/python scripts/compare_pixel_objectives.py fm 600 euler

Prints one JSON object (the last line); saves the samples to /tmp/gencmp/<kind>-<steps>.npy.
"""
import json
import os
import sys
import time
import numpy as np, torch, torch.nn.functional as F
from diffusers import UNet2DModel, DDPMScheduler, DPMSolverMultistepScheduler
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from torchdiffeq import odeint
from scipy import linalg
from rable_nb.parts import candidates
from rable_nb.data import images as data, longtail
from rable_nb.engine import networks
torch.set_num_threads(1)
STEPS, B, C, W = int(sys.argv[2]), 32, 10, 2.0
kind = sys.argv[1]
cifar = data.load_cifar10()
idx = longtail.balanced_subset(cifar.train_y, 200, 0)
x = networks.to_unit(torch.as_tensor(cifar.train_x[idx])) * 2 - 1
y = torch.as_tensor(cifar.train_y[idx])
torch.manual_seed(0)
net = UNet2DModel(sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                  norm_num_groups=8, attention_head_dim=32, num_class_embeds=C + 1)
opt = torch.optim.AdamW(net.parameters(), 2e-4)
ddpm = DDPMScheduler(1000, beta_schedule="squaredcos_cap_v2")
cfm = ConditionalFlowMatcher(sigma=0.0)
t0 = time.time()
for s in range(STEPS):
    g = torch.Generator().manual_seed(s)
    i = torch.randint(len(x), (B,), generator=g)
    x1, lab = x[i], y[i].clone()
    lab[torch.rand(B, generator=g) < 0.1] = C
    if kind == "ddpm":
        noise = torch.randn(x1.shape, generator=g)
        t = torch.randint(0, 1000, (B,), generator=g)
        pred = net(ddpm.add_noise(x1, noise, t), t, class_labels=lab).sample
        loss = F.mse_loss(pred, noise)
    else:
        torch.manual_seed(s)
        x0 = torch.randn(x1.shape, generator=g)
        t, xt, ut = cfm.sample_location_and_conditional_flow(x0, x1)
        loss = F.mse_loss(net(xt, t * 999, class_labels=lab).sample, ut)
    opt.zero_grad(); loss.backward(); opt.step()
    if s % 100 == 0: print(s, float(loss), f"{time.time()-t0:.0f}s", flush=True)
train_s = time.time() - t0
net.eval()
judge, info = candidates.clean_classifier(cifar, "small_cnn", 3, 0, "cpu", 1000)
feat = lambda imgs: judge[0](networks.normalize(torch.as_tensor(imgs))).detach().double().numpy()
def fd(a, b):
    m1, m2 = a.mean(0), b.mean(0); s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cs = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * cs))
test_i = longtail.balanced_subset(cifar.test_y, 100, 0)
with torch.no_grad():
    real_f = feat(cifar.test_x[test_i])
N = 300
labels = torch.arange(N) % C
def guided(xt, t, lab):
    out = net(torch.cat([xt, xt]), torch.cat([t, t]), class_labels=torch.cat([lab, torch.full_like(lab, C)])).sample
    c, u = out.chunk(2)
    return u + W * (c - u)
res = {"kind": kind, "steps": STEPS, "train_s": round(train_s, 1), "judge_acc_real": info["test_accuracy"]}
for nfe in (10, 20):
    t1 = time.time()
    with torch.no_grad():
        z = torch.randn((N, 3, 32, 32), generator=torch.Generator().manual_seed(123))
        if kind == "ddpm":
            sch = DPMSolverMultistepScheduler.from_config(ddpm.config)
            sch.set_timesteps(nfe)
            for t in sch.timesteps:
                z = sch.step(guided(z, t.expand(N), labels), t, z).prev_sample
        else:
            meth = sys.argv[3] if len(sys.argv) > 3 else "euler"
            n_steps = nfe if meth == "euler" else nfe // 2
            f = lambda t, xt: guided(xt, (t * 999).expand(N), labels)
            z = odeint(f, z, torch.linspace(0, 1, 2), method=meth, options={"step_size": 1 / n_steps})[-1]
    imgs = ((z.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        sf = feat(imgs)
        acc = float((judge(networks.normalize(torch.as_tensor(imgs))).argmax(1) == labels).float().mean())
    res[f"nfe{nfe}"] = dict(fd_judge=round(fd(sf, real_f), 2), judge_acc=round(acc, 3), sample_s=round(time.time() - t1, 1))
    os.makedirs("/tmp/gencmp", exist_ok=True)
    np.save(f"/tmp/gencmp/{kind}-{nfe}.npy", imgs)
print(json.dumps(res), flush=True)
