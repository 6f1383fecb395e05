"""
Pick-a-Pic caption prompts for PickScore training (needs internet; run it once, then train offline):

    python data/pickscore/prepare.py                    # -> data/pickscore/{train,test}.txt
    python data/pickscore/prepare.py --source=pickapic --n_test=2048 --seed=0

--source=flow_grpo (default) fetches, over plain HTTPS, the train/test split of Pick-a-Pic captions
that Flow-GRPO ships in its repository (dataset/pickscore/{train,test}.txt; its test set has 2048
prompts). DiffusionNFT's code is built on Flow-GRPO's and, as far as we know, trains on the same
files (its repository was not available to check), so numbers stay comparable with those papers.
--source=pickapic rebuilds a split from the captions of the Pick-a-Pic v1 dataset on the Hugging Face
hub (yuvalkirstain/pickapic_v1_no_images, column "caption") with the `datasets` package (pip install
datasets): whitespace-normalised, de-duplicated, shuffled with the seed, the first n_test to test.
One prompt a line, the format sample.read_prompts reads. data/pickscore/tiny_{train,test}.txt are a
few hand-written prompts in the same style for the tiny CPU config.
"""
import argparse
import os
import random
import urllib.request

FLOW_GRPO_URL = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/{split}.txt"
PICKAPIC = "yuvalkirstain/pickapic_v1_no_images"


def fetch(url, timeout=60):
    """The text at `url`, or SystemExit with one sentence (no network here: that is expected)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode("utf-8")
    except Exception as err:  # URLError, timeouts, HTTP errors
        raise SystemExit(f"could not fetch {url} ({type(err).__name__}): "
                         f"run this on a machine with internet, "
                         f"or copy train.txt and test.txt from Flow-GRPO's dataset/pickscore "
                         f"into data/pickscore/")


def clean(lines):
    """Whitespace-normalised, non-empty, de-duplicated, order kept."""
    seen, out = set(), []
    for ln in lines:
        ln = " ".join(str(ln).split())
        if ln and ln not in seen:
            seen.add(ln)
            out.append(ln)
    return out


def from_pickapic(seed, n_test):
    try:
        import datasets
    except ImportError:
        raise SystemExit("--source=pickapic needs the datasets package: pip install datasets "
                         "(or use --source=flow_grpo)")
    try:
        captions = datasets.load_dataset(PICKAPIC, split="train")["caption"]
    except Exception as err:
        raise SystemExit(f"could not load {PICKAPIC} ({type(err).__name__}): "
                         f"run this on a machine with internet")
    prompts = clean(captions)
    random.Random(seed).shuffle(prompts)
    return prompts[n_test:], prompts[:n_test]


def write_lines(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)  # never leave a half-written file


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--source", choices=("flow_grpo", "pickapic"), default="flow_grpo")
    p.add_argument("--url", default=FLOW_GRPO_URL, help="with {split}; for --source=flow_grpo")
    p.add_argument("--seed", type=int, default=0, help="for --source=pickapic")
    p.add_argument("--n_test", type=int, default=2048, help="for --source=pickapic")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    a = p.parse_args(argv)
    if a.source == "flow_grpo":
        # kept exactly as published (only blank lines dropped) so the split matches the papers'
        train, test = ([ln.strip() for ln in fetch(a.url.format(split=s)).splitlines() if ln.strip()]
                       for s in ("train", "test"))
    else:
        train, test = from_pickapic(a.seed, a.n_test)
    os.makedirs(a.out_dir, exist_ok=True)
    for name, lines in (("train.txt", train), ("test.txt", test)):
        write_lines(os.path.join(a.out_dir, name), lines)
        print(f"{os.path.join(a.out_dir, name)}: {len(lines)} prompts")


if __name__ == "__main__":
    main()
