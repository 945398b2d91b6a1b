"""Users' existing Slurm batch scripts: #SBATCH directives become the request; conflicts and the unsupported
are reported."""

from __future__ import annotations

import pytest

from federation import sbatch
from tests.test_bad_input import aifed, conn

SCRIPT = """#!/bin/bash
# a training job
#SBATCH --job-name=llama-ft
#SBATCH -p gpu
#SBATCH --gres=gpu:a100:2
#SBATCH --time=1-02:00:00
#SBATCH -c 8 --mem=32G
#SBATCH --account=ai-health
#SBATCH --output=slurm-%j.out
#SBATCH --exclusive
#SBATCH --nodes=1

srun python train.py
#SBATCH --partition=after-the-first-command-is-not-a-directive
"""


def test_directives_become_the_request():
    d = sbatch.parse(SCRIPT)
    assert d.values == {"name": "llama-ft", "partition": "gpu", "gpus": 2, "walltime_s": 26 * 3600, "cpus": 8,
                        "memory_mb": 32 * 1024, "project": "ai-health"}
    assert any("line 9" in n and "--output" in n and "aifed logs" in n for n in d.notes)
    assert any("line 10" in n and "--exclusive is not supported" in n for n in d.notes)


@pytest.mark.parametrize("line,words", [
    ("#SBATCH --nodes=4", "single-node"),
    ("#SBATCH --time=soon", "is not a duration"),
    ("#SBATCH --gres=gpu:lots", "is not a GPU count"),
    ("#SBATCH -p", "needs a value"),
    ("#SBATCH --mem=huge", "is not a size"),
])
def test_bad_directives_name_the_line(line, words):
    with pytest.raises(sbatch.DirectiveError) as err:
        sbatch.parse(f"#!/bin/sh\n{line}\necho hi\n")
    assert "line 2" in str(err.value) and words in str(err.value)


def test_contradicting_directives():
    with pytest.raises(sbatch.DirectiveError, match="line 3: #SBATCH --partition=b contradicts line 2"):
        sbatch.parse("#!/bin/sh\n#SBATCH -p a\n#SBATCH --partition=b\n")


def test_gpu_spellings():
    for text in ("-G 3", "--gpus=3", "--gpus-per-node=3", "--gres=gpu:3", "--gres=gpu:h100:3"):
        assert sbatch.parse(f"#SBATCH {text}\n").values["gpus"] == 3, text


async def test_cli_submits_an_existing_sbatch_script(fed, test_pki, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/sh\n#SBATCH -J from-script\n#SBATCH --gpus=2\n#SBATCH -t 10\n#SBATCH --mail-type=END\n"
                      "echo \"gpus=$CUDA_VISIBLE_DEVICES arg=$1\"\n")
    c = conn(fed, test_pki.user("antenna-a", "alice"))
    rc, out, err = await aifed("submit", *c, "--wait", "--json", str(script), "--epochs")
    assert rc == 0, err
    assert "--mail-type=END is not supported by aifed and is ignored" in err
    import orjson
    job = orjson.loads(out)
    assert (job["spec"]["name"], job["spec"]["gpus"], job["spec"]["walltime_s"]) == ("from-script", 2, 600)
    assert job["spec"]["script_args"] == ["--epochs"]
    rc, out, _ = await aifed("logs", *c, job["id"])
    assert out == "gpus=0,1 arg=--epochs\n"


async def test_cli_refuses_a_flag_that_contradicts_the_script(fed, test_pki, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/sh\n#SBATCH --gres=gpu:4\necho hi\n")
    rc, _, err = await aifed("submit", *conn(fed, test_pki.user("antenna-a", "alice")), "-G", "2", str(script))
    assert rc == 2 and "line 2 sets gpus to 4, but the command line says 2" in err
    assert fed.antennas["antenna-a"].core.journal.count() == 0


def test_attached_values_indentation_and_bare_gpu_like_sbatch():
    d = sbatch.parse("#!/bin/sh\n#SBATCH -c4 -pgpu\n  #SBATCH -G 8\n#SBATCH --gres=gpu\n")
    assert d.values == {"cpus": 4, "partition": "gpu", "gpus": 1}  # the indented line is not a directive
