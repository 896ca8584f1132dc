"""The denoising objective: timestep sampling and Min-SNR-γ weighting."""

import pytest
import torch
from diffusers import DDPMScheduler

from conftrl.cli.train import train
from conftrl.diffusion.objective import denoising_loss, sample_timesteps


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000)


def test_uniform_sampling_draws_exactly_what_sd_training_draws(scheduler):
    # Runs and checkpoints made before the option existed must resume onto the same noise.
    drawn = sample_timesteps(scheduler, 256, torch.Generator().manual_seed(3))
    expected = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, expected)


def test_cubic_sampling_stays_in_range_and_favours_high_noise(scheduler):
    drawn = sample_timesteps(scheduler, 20000, torch.Generator().manual_seed(0), sampling="cubic")
    assert drawn.dtype == torch.long and drawn.min() >= 0 and drawn.max() <= 999
    # t = (1 - u³)·T: P(t ≥ T/2) = P(u³ ≤ 1/2) = 0.5^(1/3) ≈ 0.794, against 0.5 for uniform.
    assert (drawn >= 500).float().mean().item() == pytest.approx(0.5 ** (1 / 3), abs=0.01)


def test_unknown_sampling_is_refused_by_name(scheduler):
    with pytest.raises(ValueError, match="'logit'.*uniform, cubic"):
        sample_timesteps(scheduler, 4, torch.Generator(), sampling="logit")


def test_a_run_with_an_unknown_sampling_is_refused_before_training(make_config):
    with pytest.raises(ValueError, match=r"loss.timesteps='logit': Input should be 'uniform' or 'cubic'"):
        train(make_config("loss.timesteps=logit"))


def test_min_snr_weighting_only_down_weights_nearly_clean_timesteps(scheduler):
    timesteps = torch.tensor([5, 900])  # SNR ≫ 5 and SNR ≪ 1
    prediction, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    target[1] *= 2  # per-sample MSE 1 and 4
    plain = denoising_loss(prediction, target, scheduler, timesteps)
    assert plain.item() == pytest.approx(2.5)
    # A γ above every SNR changes nothing; γ = 5 scales the clean sample by 5/SNR and keeps the noisy one.
    assert denoising_loss(prediction, target, scheduler, timesteps, snr_gamma=1e12).item() == pytest.approx(2.5)
    alphas = scheduler.alphas_cumprod[5]
    snr = (alphas / (1 - alphas)).item()
    weighted = denoising_loss(prediction, target, scheduler, timesteps, snr_gamma=5.0)
    assert weighted.item() == pytest.approx((1 * 5 / snr + 4) / 2, rel=1e-5)
