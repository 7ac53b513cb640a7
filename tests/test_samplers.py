import pytest
import torch

from sdserve.engine import samplers


@pytest.mark.parametrize(
    ("name", "schedule", "sampler", "label"),
    [
        ("DPM++ 2M", None, "DPM++ 2M", "Karras"),  # A1111's "Automatic" for DPM++ 2M is Karras
        ("DPM++ 2M SDE", "automatic", "DPM++ 2M SDE", "Exponential"),
        ("Euler a", None, "Euler a", "Automatic"),
        ("DPM++ 2M Karras", None, "DPM++ 2M", "Karras"),  # legacy combined name
        ("DPM++ 2M", "Exponential", "DPM++ 2M", "Exponential"),  # label as well as name
        ("k_euler_a", "sgm_uniform", "Euler a", "SGM Uniform"),  # alias
        ("euler", "karras", "Euler", "Karras"),  # case-insensitive
        ("LMS Karras", None, "LMS", "Karras"),
    ],
)
def test_resolve(name, schedule, sampler, label):
    resolved = samplers.resolve(name, schedule)
    assert resolved.sampler.name == sampler
    assert resolved.schedule.label == label


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(samplers.UnknownSamplerError) as err:
        samplers.resolve("Euler b")
    message = str(err.value)
    assert "Euler b" in message
    for name in ("Euler a", "DPM++ 2M", "UniPC", "LCM"):
        assert name in message


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(samplers.UnknownSamplerError, match="karras"):
        samplers.resolve("Euler", "polyexponential")


def test_schedule_a_sampler_cannot_take_is_refused():
    with pytest.raises(samplers.UnknownSamplerError, match="not available for sampler 'DDIM'"):
        samplers.resolve("DDIM", "karras")


def test_scheduler_keeps_model_noise_schedule_and_applies_schedule():
    base = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
            "_class_name": "PNDMScheduler", "steps_offset": 1}
    sched = samplers.make_scheduler(samplers.resolve("DPM++ 2M Karras"), base)
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.use_karras_sigmas is True
    assert sched.config.beta_end == 0.012
    assert sched.config.algorithm_type == "dpmsolver++"
    sde = samplers.make_scheduler(samplers.resolve("DPM++ 2M SDE"), base)
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    assert sde.config.use_exponential_sigmas is True


def test_every_issue_sampler_is_known():
    expected = {"Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE",
                "DPM++ SDE", "DDIM", "PLMS", "UniPC", "LCM"}
    assert expected <= set(samplers.sampler_names())
    assert {"automatic", "karras", "exponential", "sgm_uniform", "uniform"} <= {s.name for s in samplers.SCHEDULES}


@pytest.mark.parametrize("sampler", samplers.SAMPLERS, ids=lambda s: s.name)
def test_static_schedule_table_matches_the_diffusers_scheduler(sampler):
    """The API role validates without diffusers; this keeps its table true to what the engine can build."""
    keys = samplers.config_keys(sampler.scheduler_class)
    for schedule in samplers.SCHEDULES:
        fits = all(k in keys for k in schedule.overrides)
        assert (schedule.name in sampler.schedules) == fits, (sampler.name, schedule.name)
        if fits:
            resolved = samplers.resolve(sampler.name, schedule.name)
            built = samplers.make_scheduler(resolved, {"beta_schedule": "scaled_linear"})
            assert type(built).__name__ == sampler.scheduler_class
            for knob, value in resolved.schedule.overrides.items():
                assert built.config[knob] == value


def test_automatic_on_a_zero_terminal_snr_model_spaces_evenly_from_pure_noise():
    from diffusers import EulerDiscreteScheduler

    sd15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    ztsnr = {"_class_name": "EulerDiscreteScheduler", **sd15, "rescale_betas_zero_snr": True,
             "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    # the same schedule written out as trained_betas (what a sampler without diffusers' flag can still take)
    alphas_bar = EulerDiscreteScheduler.from_config(ztsnr).alphas_cumprod.double()
    betas = (1 - alphas_bar / torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])).tolist()
    assert samplers.zero_terminal_snr(ztsnr) and samplers.zero_terminal_snr({"trained_betas": betas})
    assert not samplers.zero_terminal_snr(sd15) and not samplers.zero_terminal_snr({"trained_betas": [0.005] * 1000})
    # Karras from such a model's last sigma (4096) would spend most of 20 steps on pure noise
    assert samplers.resolve("DPM++ 2M", None, zero_snr=True).schedule.label == "SGM Uniform"
    assert samplers.resolve("DPM++ 2M SDE", "automatic", zero_snr=True).schedule.label == "SGM Uniform"
    # a schedule the client names is kept; a sampler without timestep spacing keeps its own default
    assert samplers.resolve("DPM++ 2M Karras", None, zero_snr=True).schedule.label == "Karras"
    assert samplers.resolve("DPM++ 2M", "karras", zero_snr=True).schedule.label == "Karras"
    assert samplers.resolve("DPM++ SDE", None, zero_snr=True).schedule.label == "Karras"
    assert samplers.resolve("DPM++ 2M", None).schedule.label == "Karras"
    sched = samplers.make_scheduler(samplers.resolve("DPM++ 2M", None, zero_snr=True), ztsnr)
    sched.set_timesteps(20)
    assert int(sched.timesteps[0]) == 999 and sched.config.prediction_type == "v_prediction"
