"""Bench for quest_14_1.py: FP32 | PTQ per-tensor MinMax | PTQ per-channel histogram | QAT (and the pt2e flows)
on the same trained FP32 model per seed, and the setting where QAT pays.

    .venv/bin/python bench/bench_quant.py                          # shipped digits, seeds 0-3, every row
    .venv/bin/python bench/bench_quant.py --rows minmax,histogram,qat,ft-control --seeds 0-7
    .venv/bin/python bench/bench_quant.py --data-dir ./data        # full MNIST, if you have it

Imports the script and calls its own functions (no second implementation of a flow): per seed it trains the FP32
model once with the script's defaults (100 Adam batches of 64), then quantizes that same model once per row, so
every difference between rows is the quantization. Accuracy is on the test split, per seed and as the mean;
size is the state_dict file; latency is the median CPU time of one batch of 256, FP32 and INT8 timed in the same
minute (compare them as ratios within a row: the machine's load moves both).

Rows (the script's defaults unless named):
  minmax       eager PTQ, --observer minmax: per-tensor MinMax weights and activations (torch.ao default_qconfig)
  histogram    eager PTQ, --observer histogram (the default): per-channel weights, histogram activations
  qat          eager QAT, --qat-batches 40 --qat-lr 1e-4, observers frozen for the second half
  ft-control   not a flow: the FP32 model fine-tuned on the same 40 batches at the same lr without fake
               quantization, then PTQ histogram. QAT's extra steps also train an undertrained model; this row
               separates that from what fake quantization buys.
  pt2e         torchao PT2E + X86InductorQuantizer, torch.compile'd (latency of the compiled model)
  pt2e-qat     prepare_qat_pt2e with the qat row's fine-tuning, torch.compile'd
  wN-ptq       looking for where QAT pays: N-bit weights (range -2^(N-1)..2^(N-1)-1, per channel, stored in int8;
               a bench-only qconfig), histogram activations, PTQ
  wN-qat       the same N-bit weights learned with QAT (the qat row's fine-tuning)
  wN-ft        the ft-control row at N bits: fine-tuned FP32, then N-bit PTQ
SQNR is against the trained FP32 model in every row, so the fine-tuned rows include how far fine-tuning moved it.
"""
import argparse
import contextlib
import io
import itertools
import json
import statistics
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.kit import import_script  # noqa: E402

ROWS = ("minmax", "histogram", "qat", "ft-control", "pt2e", "pt2e-qat",
        *(f"w{bits}-{kind}" for bits in (4, 3, 2) for kind in ("ptq", "qat", "ft")))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO / "assets" / "mnist-5k"), help="MNIST root")
    p.add_argument("--seeds", default="0-3", help="a-b or comma-separated")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {','.join(ROWS)}")
    p.add_argument("--latency-seconds", type=float, default=1.0, help="timing budget per model at batch 256")
    p.add_argument("--qat-lr", type=float, help="the QAT rows' fine-tuning lr (None: the script's default)")
    p.add_argument("--log", help="append one JSON line per (row, seed) here")
    return p.parse_args()


def seeds_of(text):
    if "-" in text:
        low, high = map(int, text.split("-"))
        return list(range(low, high + 1))
    return [int(s) for s in text.split(",")]


def low_bit_qconfigs(torch, engine, bits):
    """N-bit weights (per-channel symmetric, stored in int8) with the engine's default activations: (PTQ, QAT)."""
    from torch.ao.quantization import (FakeQuantize, MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver,
                                       QConfig, get_default_qat_qconfig, get_default_qconfig)
    weight = dict(quant_min=-2 ** (bits - 1), quant_max=2 ** (bits - 1) - 1, dtype=torch.qint8,
                  qscheme=torch.per_channel_symmetric)
    ptq = QConfig(activation=get_default_qconfig(engine).activation, weight=PerChannelMinMaxObserver.with_args(**weight))
    qat = QConfig(activation=get_default_qat_qconfig(engine).activation,
                  weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, **weight))
    return ptq, qat


def main():
    args = parse_args()
    quest = import_script("quest_14_1.py")
    torch = quest.torch
    quest.silence_known_warnings()
    warnings.filterwarnings("ignore", message=r".*(deprecated|TypedStorage|To copy construct).*")
    defaults = quest.parse_args(["--data-dir", args.data_dir])
    defaults.qat_lr = args.qat_lr or defaults.qat_lr
    engine = quest.pick_engine("auto", "eager")[0]
    rows = args.rows.split(",")
    images, labels = quest.load_mnist("mnist", args.data_dir, train=True)
    x, y = quest.normalize(images), labels
    images, labels = quest.load_mnist("mnist", args.data_dir, train=False)
    test_x, test_y = quest.normalize(images), labels
    latency_x = test_x[torch.arange(256) % len(test_x)]
    low_bit = {bits: low_bit_qconfigs(torch, engine, bits) for bits in (2, 3, 4, 5, 6, 7)}
    cpu = torch.device("cpu")
    results = {row: [] for row in ["fp32", *rows]}
    for seed in seeds_of(args.seeds):
        torch.manual_seed(seed)
        batches = quest.shuffled_batches(len(x), defaults.batch_size, torch.Generator().manual_seed(seed), "cpu")
        fp32 = quest.MiniCNN()
        with contextlib.redirect_stderr(io.StringIO()):
            quest.train(fp32, x, y, list(itertools.islice(batches, defaults.train_batches)), defaults.lr, cpu,
                        "FP32 training", "--lr")
        fp32.eval()
        calib = list(itertools.islice(batches, defaults.calib_batches))
        qat_batches = list(itertools.islice(batches, defaults.qat_batches))  # main's order: calib, then QAT
        fp32_ms = quest.latency_ms(fp32, latency_x, args.latency_seconds)
        results["fp32"].append({"seed": seed, "acc": quest.accuracy(fp32, test_x, test_y), "latency_ms_b256": fp32_ms,
                                "size_kb": quest.state_dict_sizes_kb({"f": fp32})["f"]})

        def fine_tuned_fp32():
            model = quest.cpu_copy(fp32)
            quest.train(model, x, y, qat_batches, defaults.qat_lr, cpu, "FP32 fine-tuning", "--qat-lr")
            return model.eval()

        def qat_with(qconfig):
            torch.backends.quantized.engine = engine
            model = quest.cpu_copy(fp32).train().fuse(qat=True)
            model.qconfig = qconfig
            torch.ao.quantization.prepare_qat(model, inplace=True)
            quest.fine_tune(model, x, y, qat_batches, len(qat_batches), defaults.qat_lr,
                            torch.ao.quantization.disable_observer)
            return torch.ao.quantization.convert(model.eval(), inplace=True)

        def ptq_with(model, qconfig):
            torch.backends.quantized.engine = engine
            model = quest.cpu_copy(model).eval().fuse()
            model.qconfig = qconfig
            torch.ao.quantization.prepare(model, inplace=True)
            with torch.inference_mode():
                for idx in calib:
                    model(x[idx])
            return torch.ao.quantization.convert(model, inplace=True)

        build = {
            "minmax": lambda: quest.quantize_eager(fp32, x, calib, engine, "minmax"),
            "histogram": lambda: quest.quantize_eager(fp32, x, calib, engine, "histogram"),
            "qat": lambda: quest.quantize_qat(fp32, x, y, qat_batches, len(qat_batches), engine, defaults.qat_lr)[0],
            "ft-control": lambda: quest.quantize_eager(fine_tuned_fp32(), x, calib, engine, "histogram"),
            "pt2e": lambda: quest.quantize_pt2e(fp32, x, calib, "x86_inductor"),
            "pt2e-qat": lambda: quest.quantize_pt2e_qat(fp32, x, y, qat_batches, len(qat_batches), "x86_inductor",
                                                         defaults.qat_lr)[0],
        }
        for bits, (ptq, qat) in low_bit.items():
            build[f"w{bits}-ptq"] = lambda ptq=ptq: ptq_with(fp32, ptq)
            build[f"w{bits}-qat"] = lambda qat=qat: qat_with(qat)
            build[f"w{bits}-ft"] = lambda ptq=ptq: ptq_with(fine_tuned_fp32(), ptq)
        for row in rows:
            with contextlib.redirect_stderr(io.StringIO()):
                int8 = build[row]()
                runner = int8
                if row.startswith("pt2e"):
                    runner, _ = quest.compile_for_cpu(int8, [quest.ACCURACY_BATCH, 256], test_x)
            record = {"seed": seed, "acc": quest.accuracy(runner, test_x, test_y),
                      "size_kb": quest.state_dict_sizes_kb({"q": int8})["q"],
                      "latency_ms_b256": quest.latency_ms(runner, latency_x, args.latency_seconds),
                      "fp32_latency_ms_b256": quest.latency_ms(fp32, latency_x, args.latency_seconds),
                      "layers": quest.layer_sqnr(fp32, int8, x, calib, "pt2e" if row.startswith("pt2e") else "eager")}
            results[row].append(record)
            print(f"seed {seed} {row:11} acc {record['acc']:.4f} (FP32 {results['fp32'][-1]['acc']:.4f}) "
                  f"{record['size_kb']:.1f} KB b256 {record['latency_ms_b256']:.2f} ms "
                  f"(FP32 {record['fp32_latency_ms_b256']:.2f})", flush=True)
            if args.log:
                with open(args.log, "a") as log:
                    log.write(json.dumps({"row": row, **record}) + "\n")

    fp32_acc = {r["seed"]: r["acc"] for r in results["fp32"]}
    fp32_kb = results["fp32"][0]["size_kb"]
    print(f"\n{args.data_dir}; seeds {args.seeds}; engine {engine}; qat lr {defaults.qat_lr:g}; CPU latency at batch "
          f"256, {torch.get_num_threads()} threads, median per seed then median over seeds")
    print(f"{'row':12}{'acc mean':>9}{'- FP32, per seed (points)':>36}{'KB':>8}{'ratio':>7}{'INT8 ms':>9}{'FP32 ms':>9}"
          f"{'speedup':>8}  SQNR dB conv1/conv2/fc1 (mean)")
    print(f"{'fp32':12}{statistics.mean(fp32_acc.values()):>9.4f}{'':>36}{fp32_kb:>8.1f}{'':>7}{'':>9}"
          f"{statistics.median(r['latency_ms_b256'] for r in results['fp32']):>9.2f}")
    for row in rows:
        runs = results[row]
        deltas = " ".join(f"{100 * (r['acc'] - fp32_acc[r['seed']]):+.1f}" for r in runs)
        int8_ms = statistics.median(r["latency_ms_b256"] for r in runs)
        fp32_ms = statistics.median(r["fp32_latency_ms_b256"] for r in runs)
        sqnr = "/".join(f"{statistics.mean(r['layers'][i]['sqnr_db'] for r in runs):.1f}" for i in range(3))
        print(f"{row:12}{statistics.mean(r['acc'] for r in runs):>9.4f}{deltas:>36}{runs[0]['size_kb']:>8.1f}"
              f"{fp32_kb / runs[0]['size_kb']:>6.2f}x{int8_ms:>9.2f}{fp32_ms:>9.2f}{fp32_ms / int8_ms:>7.2f}x  {sqnr}")


if __name__ == "__main__":
    main()
