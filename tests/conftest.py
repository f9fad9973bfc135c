import pytest
import torch

from mythos_deploy import MythosConfig, MythosModel

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg() -> MythosConfig:
    return MythosConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> MythosModel:
    return MythosModel(tiny_cfg).init_weights(seed=0).eval()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model):
    from mythos_deploy import save_checkpoint
    from mythos_deploy.tokenizer import ByteTokenizer
    path = tmp_path / "tiny"
    save_checkpoint(tiny_model, path, tokenizer=ByteTokenizer().to_dict())
    return path
