"""python -m tokpost_fast.sample: run dir -> PNG grid, and refusal of a tokenizer the generator was not trained on."""

import pytest
import torch
from PIL import Image

from tokpost_fast.models.generator import build_generator, generator_config, save_generator
from tokpost_fast.models.tokenizer import build_tokenizer, save_tokenizer, tokenizer_config
from tokpost_fast.atomic import file_sha256
from tokpost_fast.sample import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tokenizer_config("demo"))            # 64x64 images, 8x8 tokens, K = 1024
    save_tokenizer(tokenizer, str(folder / "tokenizer.pt"))
    cfg = generator_config("demo", vocab_size=tokenizer.codebook_size, seq_len=tokenizer.grid_size ** 2,
                           num_classes=4, width=32, depth=1, heads=2)
    save_generator(build_generator(cfg), folder / "generator.pt",
                   extra={"tokenizer_hash": file_sha256(folder / "tokenizer.pt")})
    return folder


def test_sample_cli_writes_a_grid(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    main(["--run-dir", str(run_dir), "--classes", "0,2,3", "--num", "2", "--out", str(out), "--cfg-scale", "2.0",
          "--top-k", "50", "--batch-size", "4"])
    image = Image.open(out)
    assert image.size == (2 * 66 + 2, 3 * 66 + 2)      # make_grid: 64 px images, 2 px padding, 2 per row, 3 rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_sample_cli_refuses_another_tokenizer(run_dir, tmp_path):
    other = tmp_path / "run"
    other.mkdir()
    (other / "generator.pt").write_bytes((run_dir / "generator.pt").read_bytes())
    torch.manual_seed(1)
    save_tokenizer(build_tokenizer(tokenizer_config("demo")), str(other / "tokenizer.pt"))
    with pytest.raises(ValueError, match="not the tokenizer this generator was trained on"):
        main(["--run-dir", str(other), "--classes", "0", "--num", "1", "--out", str(tmp_path / "x.png")])


def test_sample_cli_rejects_unknown_class(run_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["--run-dir", str(run_dir), "--classes", "9", "--num", "1", "--out", str(tmp_path / "x.png")])


def test_sample_cli_takes_another_tokenizer_and_defaults_to_every_class(run_dir, tmp_path):
    """--tokenizer decodes with e.g. a post-trained export (accepted through its recorded source); without
    --classes every class of the generator gets a row."""
    post = tmp_path / "tokenizer_post.pt"
    torch.manual_seed(2)
    save_tokenizer(build_tokenizer(tokenizer_config("demo")), str(post),
                   extra={"source_tokenizer": {"sha256": file_sha256(run_dir / "tokenizer.pt")}})
    out = tmp_path / "grid.png"
    main(["--run-dir", str(run_dir), "--tokenizer", str(post), "--num", "1", "--out", str(out)])
    assert Image.open(out).size == (66 + 2, 4 * 66 + 2)          # 4 classes, one image each
    stranger = tmp_path / "stranger.pt"
    save_tokenizer(build_tokenizer(tokenizer_config("demo")), str(stranger))
    with pytest.raises(ValueError, match="not the tokenizer this generator was trained on"):
        main(["--run-dir", str(run_dir), "--tokenizer", str(stranger), "--num", "1", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--run-dir", str(run_dir), "--tokenizer", str(tmp_path / "none.pt"), "--out", str(out)])
