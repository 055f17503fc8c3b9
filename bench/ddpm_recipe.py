"""Recipe search for quest_12_2's Quickstart (an experiment beside the product, not part of it).

    python bench/ddpm_recipe.py train --name base14 --epochs 14                  # the pixel 16-32-64 UNet, bf16
    python bench/ddpm_recipe.py train --name patch27 --patch-size 2 --epochs 27  # on 2x2 patches, same minutes
    python bench/ddpm_recipe.py eval --name patch27 --combos 0.999:7:2           # EMA decay : guide epoch : w
    python bench/ddpm_recipe.py export --name base30   # as a script checkpoint, for bench_ddpm.py quality

`train` runs the script's own train_step, EMA and warm-up + cosine schedule for a fixed number of epochs on the
shipped digits and keeps the EMA weights of every epoch (one EMA per --decays), so that guide epochs and EMA
decays can be compared after the fact without retraining. `eval` samples each combination with the script's
DPM-Solver-25 (eta 1, in the precision the script picks) and scores it with one judge CNN (trained once, seed 0,
kept in --work) on --n samples per seed, as `bench_ddpm.py quality` does: confident share (p >= 0.9), Frechet distance in the judge's features as a
multiple of real-vs-real (test digits [0, n) vs [n, 2n)), and for conditional runs the share given the class asked
for. A combo is DECAY:GUIDE_EPOCH:W[:STEPS[:CFG[:SIGMA_LOW-SIGMA_HIGH]]]; guide epoch 0 samples unguided; the last
field applies guidance only where the noise level sigma = sqrt((1 - ab) / ab) lies in that interval.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quest_12_2 as quest  # noqa: E402
import bench_ddpm  # noqa: E402


def unet_of(run_args):
    return quest.SimpleUNet(base_channels=run_args["base"], attention=not run_args["no_attn"],
                            channel_mult=tuple(run_args["mult"]), num_classes=10 if run_args["cond"] else 0,
                            patch_size=run_args.get("patch_size", 1))


class OnlyInInterval(torch.nn.Module):
    """Guidance only where sigma_t = sqrt((1 - ab) / ab) lies in (low, high] (Kynkaanniemi et al. 2024,
    arXiv:2404.07724): outside it the unconditional (NO_CLASS) call answers with the labels of the conditional call
    just before it, and a guide answers as the main model, so that quest.sample's extrapolation changes nothing.
    Relies on quest.sample asking for the conditional prediction before the NO_CLASS one."""

    def __init__(self, model, schedule, interval, main=None):
        super().__init__()
        self.model, self.main, (self.low, self.high), self.labels = model, main, interval, None
        self.sigma = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()

    def forward(self, x, t, *condition):
        inside = self.low < self.sigma[t[0]].item() <= self.high
        if condition and not bool((condition[0] == quest.NO_CLASS).all()):
            self.labels = condition[0]
        elif condition and not inside:
            condition = (self.labels,)
        return self.main(x, t, *condition) if self.main is not None and not inside else self.model(x, t, *condition)


def timestep_probabilities(schedule, spec):
    """'MEAN:STD': t drawn with p_t proportional to a normal density in ln sigma_t (EDM-like) times d ln sigma."""
    mean, std = (float(v) for v in spec.split(":"))
    ab = schedule.alphas_cumprod.double()
    log_sigma = 0.5 * (torch.log1p(-ab) - ab.log())
    spacing = torch.cat([log_sigma[1:2] - log_sigma[:1], (log_sigma[2:] - log_sigma[:-2]) / 2,
                         log_sigma[-1:] - log_sigma[-2:-1]])
    probabilities = torch.exp(-0.5 * ((log_sigma - mean) / std) ** 2) * spacing
    return (probabilities / probabilities.sum()).float()


def train_step_with_t(model, optimizer, schedule, x0, dtype, snr_gamma, t):
    """quest.train_step with the timesteps given (for --t-distribution)."""
    noise = torch.randn_like(x0)
    with torch.autocast(x0.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        predicted = model(schedule.get_noisy_image(x0, t, noise), t)
    per_image = F.mse_loss(predicted.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    snr = schedule.snr[t]
    loss = (per_image * snr.clamp(max=snr_gamma) / snr).mean() if snr_gamma else per_image.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train(args):
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    dtype = None if args.precision == "fp32" else torch.bfloat16
    images, labels = quest.load_training_images("mnist", args.data_dir, device)
    labels = labels if args.cond else None
    schedule = quest.NoiseSchedule(args.timesteps, device)
    model = unet_of(vars(args))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, args.beta2))
    emas = {decay: quest.EMA(model, decay) for decay in args.decays}
    t_probabilities = timestep_probabilities(schedule, args.t_distribution) if args.t_distribution else None
    batches = math.ceil(len(images) / args.batch_size)
    total_steps, step, snapshots, losses = args.epochs * batches, 0, {}, []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order, summed = torch.randperm(len(images)), 0.0
        for i in range(batches):
            for group in optimizer.param_groups:
                group["lr"] = args.lr * quest.warmup_cosine(step, total_steps, args.warmup_steps, final=args.final_lr)
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            if t_probabilities is not None:
                t = torch.multinomial(t_probabilities, len(batch), replacement=True)
                loss = train_step_with_t(model, optimizer, schedule, images[batch], dtype, args.snr_gamma, t)
            else:
                loss = quest.train_step(model, optimizer, schedule, images[batch], dtype, args.snr_gamma,
                                        labels[batch] if labels is not None else None, args.cond_drop)
            summed += loss.item()
            for ema in emas.values():
                ema.update(model)
            step += 1
        losses.append(summed / batches)
        snapshots[epoch + 1] = {decay: copy.deepcopy(ema.model.state_dict()) for decay, ema in emas.items()}
        print(f"epoch {epoch + 1} loss {losses[-1]:.4f} {time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    args.work.mkdir(parents=True, exist_ok=True)
    torch.save({"args": {k: v for k, v in vars(args).items() if k != "work"}, "model": model.state_dict(),
                "snapshots": snapshots, "losses": losses, "seconds": seconds},
               args.work / f"{args.name}.pt")
    print(f"trained {args.name}: {seconds:.0f} s, {args.epochs * len(images) / seconds:.0f} img/s", flush=True)


def evaluate(args):
    device = torch.device("cpu")
    judge_path = args.work / "judge.pt"
    if judge_path.exists():
        judge = torch.load(judge_path, weights_only=False)
    else:
        torch.manual_seed(0)
        judge = bench_ddpm.train_digit_classifier(args.data_dir, device)[0]
        torch.save(judge, judge_path)
    test = quest.preprocess(datasets.MNIST(args.data_dir, train=False).data)
    n = args.n
    if len(test) < 2 * n:
        sys.exit(f"error: the real-vs-real reference needs {2 * n} test digits, {args.data_dir} has {len(test)}")
    dtype = quest.speed_path("auto", device)[0]  # as the script samples: bf16 where the CPU has it natively
    real = bench_ddpm.judge_features(judge, test[:n])[0]
    fd_real = bench_ddpm.frechet_distance(bench_ddpm.judge_features(judge, test[n:2 * n])[0], real)
    run = torch.load(args.work / f"{args.name}.pt", weights_only=False)
    run_args = run["args"]
    if run_args["cond"] and n % 10:
        sys.exit("error: a conditional run is scored on all 10 classes; pass an --n divisible by 10")
    schedule = quest.NoiseSchedule(run_args["timesteps"], device)

    def network(state):
        model = unet_of(run_args)
        model.load_state_dict(state)
        return model.eval()

    last = max(run["snapshots"])
    guide_decay = run_args["decays"][-1]
    labels = torch.arange(10).repeat_interleave(n // 10) if run_args["cond"] else None
    for combo in args.combos:
        fields = combo.split(":") + [None] * 3
        decay, guide_epoch, w = float(fields[0]), int(fields[1]), float(fields[2])
        steps, cfg = int(fields[3] or 25), float(fields[4] or 1)
        interval = tuple(float(v) for v in fields[5].split("-")) if fields[5] else None
        raw = network(run["snapshots"][last][decay])
        guide = network(run["snapshots"][guide_epoch][guide_decay]) if guide_epoch else None
        model = raw
        if interval:
            guide = OnlyInInterval(guide, schedule, interval, main=raw) if guide is not None else None
            model = OnlyInInterval(raw, schedule, interval)
        scores = []
        for seed in args.seeds:
            samples, *_ = quest.sample(model, schedule, n, "dpm", steps, device, dtype=dtype, seed=seed,
                                       guide=guide, guidance=w if guide else 1.0, eta=1.0, labels=labels, cfg=cfg)
            features, probabilities = bench_ddpm.judge_features(judge, samples)
            confidence, label = probabilities.max(1)
            asked = ((confidence >= 0.9) & (label == labels)).float().mean().item() if labels is not None else None
            scores.append(((confidence >= 0.9).float().mean().item(),
                           bench_ddpm.frechet_distance(features, real) / fd_real, asked))
        confident, fd_ratio = (sum(s[i] for s in scores) / len(scores) for i in (0, 1))
        asked = sum(s[2] for s in scores) / len(scores) if labels is not None else None
        print(f"{args.name:16} {combo:24} confident {confident:.1%}  FD {fd_ratio:.2f}x real"
              + (f"  asked {asked:.1%}" if asked is not None else "")
              + "   per seed " + " ".join(f"{s[0]:.3f}/{s[1]:.2f}" for s in scores), flush=True)
        print(json.dumps({"name": args.name, "combo": combo, "confident": confident, "fd_ratio": fd_ratio,
                          "asked": asked, "n": n, "seeds": args.seeds}), flush=True)


def export(args):
    """The run as quest_12_2 writes a checkpoint (the last EMA of the slowest decay, its snapshot a quarter into
    training as the guide, the config), for `bench_ddpm.py quality` and `quest_12_2.py --sample-only`."""
    run = torch.load(args.work / f"{args.name}.pt", weights_only=False)
    run_args, last = run["args"], max(run["snapshots"])
    decay, guide_epoch = run_args["decays"][-1], quest.guide_epoch(last)
    model = unet_of(run_args)
    ema = quest.EMA(model, decay)
    ema.model.load_state_dict(run["snapshots"][last][decay])
    guide = unet_of(run_args)
    guide.load_state_dict(run["snapshots"][guide_epoch][decay])
    config = {"dataset": "mnist", "timesteps": run_args["timesteps"], "beta_schedule": "linear-scaled",
              "base_channels": run_args["base"], "channel_mult": list(run_args["mult"]),
              "attention": not run_args["no_attn"], "patch_size": run_args.get("patch_size", 1),
              "conditional": run_args["cond"]}
    model.load_state_dict(run["model"])
    path = args.work / f"{args.name}_checkpoint.pt"
    path.write_bytes(quest.checkpoint_bytes(model, ema, guide, guide_epoch, torch.optim.Adam(model.parameters()),
                                            last, config))
    print(f"wrote {path} (EMA {decay} of epoch {last}, guide of epoch {guide_epoch})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["train", "eval", "export"])
    p.add_argument("--name", required=True, help="the run's name: <work>/<name>.pt")
    p.add_argument("--work", type=Path, default=Path("bench/out/recipe"))
    p.add_argument("--data-dir", default="assets/mnist-5k")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beta2", type=float, default=0.999, help="Adam's second-moment decay")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--final-lr", type=float, default=0.1, help="the cosine's end, as a share of --lr")
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--timesteps", type=int, default=300)
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--mult", type=quest.channel_mult, default=(1, 2, 4))
    p.add_argument("--patch-size", type=int, choices=[1, 2], default=1)
    p.add_argument("--no-attn", action="store_true")
    p.add_argument("--cond", action="store_true", help="a class-conditional model (labels dropped at --cond-drop)")
    p.add_argument("--cond-drop", type=float, default=0.1)
    p.add_argument("--t-distribution", default=None,
                   help="MEAN:STD of ln sigma to draw t from (EDM-like), instead of uniform t")
    p.add_argument("--decays", type=lambda s: [float(x) for x in s.split(",")], default=[0.99, 0.995, 0.999],
                   help="EMAs kept side by side; the last one's snapshots are the guides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--combos", nargs="*", default=["0.999:4:2"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--n", type=int, default=500, help="samples per seed (at most half the test digits)")
    args = p.parse_args()
    if args.cond and args.t_distribution:
        sys.exit("error: --t-distribution is written for unconditional runs; drop --cond or --t-distribution")
    {"train": train, "eval": evaluate, "export": export}[args.mode](args)


if __name__ == "__main__":
    main()
