"""ExPLoRA: parameter plan, Q/V-only LoRA, merge, DINO head / loss, EMA teacher, the SSL loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw

from roadwork_core.models.dino_head import DINOHead
from roadwork_core.models.explora import (
    ExploraConfig,
    QVLoRA,
    count_trainable_closed_form,
    merge_explora,
    setup_explora,
)
from roadwork_core.training.dino_loss import DINOLoss
from roadwork_core.training.explora import (
    DinoStudent,
    build_schedules,
    ema_update_,
    make_teacher,
    resolve_crop_sizes,
    run_explora,
    set_drop_path,
)

DIM = 32


def _pretrained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random init sets LayerScale to 1e-5 (blocks ~ identity); trained DINO models are far from it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                p.fill_(1.0)
    return model.eval()


def tiny_vit(**kw) -> torch.nn.Module:
    args = dict(pretrained=False, num_classes=0, img_size=28, embed_dim=DIM, depth=4, num_heads=2)
    args.update(kw)
    return _pretrained_like(timm.create_model(args.pop("name", "vit_small_patch14_reg4_dinov2"), **args))


def tiny_eva(name: str = "vit_small_patch16_dinov3") -> torch.nn.Module:
    return _pretrained_like(
        timm.create_model(
            name, pretrained=False, num_classes=0, embed_dim=DIM, depth=4, num_heads=2, img_size=32
        )
    )


MODELS = {
    "vit_reg4_dinov2": lambda: tiny_vit(dynamic_img_size=True),
    "eva_dinov3": tiny_eva,
    "eva_dinov3_qkvb": lambda: tiny_eva("vit_base_patch16_dinov3_qkvb"),  # F.linear on qkv.weight
}


def _randomize_lora_and_trainables(model: torch.nn.Module, seed: int = 0) -> None:
    """Make every trainable tensor non-trivial, as if training had happened."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _qkv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [blk.attn.qkv.weight.detach().clone() for blk in model.blocks]


def _synthetic_images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rng.integers(0, size - 16, 2)
            draw.rectangle([x, y, x + 16, y + 16], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        images.append(im)
    return images


def _tiny_cfg(**kw) -> ExploraConfig:
    base = dict(
        batch_size=8, out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16, n_local_crops=2, lora_rank=4
    )
    base.update(kw)
    return ExploraConfig(**base)


# ---------------------------------------------------------------- parameter plan


@pytest.mark.parametrize("unfrozen,every_other", [(0, True), (1, True), (2, True), (1, False)])
def test_trainable_count_matches_closed_form(unfrozen: int, every_other: bool) -> None:
    model = tiny_vit()
    cfg = ExploraConfig(unfrozen_blocks=unfrozen, lora_rank=4, lora_every_other=every_other)
    plan = setup_explora(model, cfg)
    expected = count_trainable_closed_form(
        embed_dim=DIM,
        depth=4,
        mlp_hidden_dim=4 * DIM,
        unfrozen_blocks=unfrozen,
        lora_rank=4,
        lora_every_other=every_other,
        num_reg_tokens=4,
    )
    assert plan.trainable_params == expected, (plan.trainable_params, expected, plan.trainable_names)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.trainable_params == counted, "plan must report what actually has requires_grad"
    assert plan.blocks_unfrozen == list(range(4 - unfrozen, 4))
    assert not set(plan.lora_blocks) & set(plan.blocks_unfrozen), "LoRA only on frozen blocks"
    assert 0 < plan.trainable_pct < 100
    assert model.patch_embed.proj.weight.requires_grad is False, "patch embedding stays frozen"
    assert model.cls_token.requires_grad and model.reg_token.requires_grad, "tokens trainable by default"


def test_plan_puts_lora_on_every_frozen_block_by_default_as_published() -> None:
    plan = setup_explora(tiny_vit(depth=6), ExploraConfig(unfrozen_blocks=1, lora_rank=2))
    assert plan.lora_blocks == [0, 1, 2, 3, 4] and plan.blocks_unfrozen == [5], plan
    assert plan.rank == 2
    half = setup_explora(
        tiny_vit(depth=6), ExploraConfig(unfrozen_blocks=1, lora_rank=2, lora_every_other=True)
    )
    assert half.lora_blocks == [0, 2, 4], "the every-other option counts back from the last frozen block"


def test_tokens_frozen_when_config_says_so() -> None:
    model = tiny_vit()
    setup_explora(model, ExploraConfig(train_cls_token=False, train_reg_tokens=False))
    assert not model.cls_token.requires_grad and not model.reg_token.requires_grad


# ---------------------------------------------------------------- Q/V-only LoRA and merge


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_changes_outputs_and_only_q_v_rows(name: str) -> None:
    model = MODELS[name]()
    before = _qkv_weights(model)
    x = torch.randn(2, 3, 32, 32) if "eva" in name else torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out_before = model(x)
    plan = setup_explora(model, ExploraConfig(unfrozen_blocks=1, lora_rank=4))
    with torch.no_grad():
        assert torch.allclose(model(x), out_before, atol=1e-6), "B=0 init: wrapping must not change outputs"
        for i in plan.lora_blocks:
            model.blocks[i].attn.qkv.parametrizations.weight[0].lora_B[0].normal_(std=0.1)
            model.blocks[i].attn.qkv.parametrizations.weight[0].lora_B[1].normal_(std=0.1)
        out_after = model(x)
    assert not torch.allclose(out_after, out_before, atol=1e-4), f"{name}: LoRA must change the features"
    d = DIM
    for i in plan.lora_blocks:
        w = model.blocks[i].attn.qkv.weight.detach()
        assert torch.equal(w[d : 2 * d], before[i][d : 2 * d]), f"{name} block {i}: K rows changed"
        assert not torch.equal(w[:d], before[i][:d]), f"{name} block {i}: Q rows unchanged"
        assert not torch.equal(w[2 * d :], before[i][2 * d :]), f"{name} block {i}: V rows unchanged"


def test_qvlora_parametrization_rows() -> None:
    lora = QVLoRA(in_features=5, row_ranges=[(0, 2), (4, 6)], rank=2, alpha=4.0)
    with torch.no_grad():
        for b in lora.lora_B:
            b.fill_(1.0)
    w = torch.zeros(6, 5)
    out = lora(w)
    assert out.shape == (6, 5)
    assert torch.equal(out[2:4], w[2:4]), "rows outside the ranges must pass through"
    expected_q = 2.0 * torch.ones(2, 2) @ lora.lora_A[0]
    assert torch.allclose(out[0:2], expected_q), "delta must be (alpha / r) * B @ A"


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_weights_reproduce_unmerged_features(name: str) -> None:
    base = MODELS[name]()
    base_keys = list(base.state_dict().keys())
    k_rows_before = [w[DIM : 2 * DIM] for w in _qkv_weights(base)]
    wrapped = copy.deepcopy(base)
    plan = setup_explora(wrapped, ExploraConfig(unfrozen_blocks=1, lora_rank=4))
    _randomize_lora_and_trainables(wrapped)
    x = torch.randn(3, 3, 32, 32) if "eva" in name else torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        feats_wrapped = wrapped(x)
    merged = merge_explora(wrapped)
    assert set(merged) == set(base_keys), "merged keys must be plain timm keys"
    fresh = MODELS[name]()
    fresh.load_state_dict(merged, strict=True)
    with torch.no_grad():
        feats_merged = fresh(x)
    torch.testing.assert_close(feats_merged, feats_wrapped, atol=1e-5, rtol=1e-4)
    for i in plan.lora_blocks:
        assert torch.equal(fresh.blocks[i].attn.qkv.weight[DIM : 2 * DIM], k_rows_before[i]), (
            f"K rows of block {i}"
        )
    assert torch.equal(merged["cls_token"], wrapped.cls_token.detach()), "cls_token saved explicitly"
    assert torch.equal(merged["reg_token"], wrapped.reg_token.detach()), "reg_token saved explicitly"


# ---------------------------------------------------------------- head, loss, teacher


def test_dino_head_shapes_and_fixed_norm() -> None:
    head = DINOHead(DIM, out_dim=20, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    out = head(torch.randn(4, DIM))
    assert out.shape == (4, 20)
    assert out.abs().max() <= 1.0 + 1e-5, "unit bottleneck x unit prototypes: logits are cosines"
    out.sum().backward()
    head.cancel_last_layer_grads()
    assert all(p.grad is None for p in head.last_layer_params()), "freeze_last_layer must drop its grads"
    assert head.mlp[0].weight.grad is not None


def test_dino_loss_center_is_ema_buffer_and_teacher_side_has_no_grad() -> None:
    loss_fn = DINOLoss(out_dim=6, student_temp=0.1, center_momentum=0.9)
    assert "center" in dict(loss_fn.named_buffers())
    teacher = torch.randn(2, 4, 6, requires_grad=True)
    student = torch.randn(3, 4, 6, requires_grad=True)
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    loss.backward()
    assert teacher.grad is None, "teacher logits must not receive gradients"
    assert student.grad is not None
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.detach().reshape(-1, 6).mean(0, keepdim=True))


def test_teacher_gets_no_gradients_and_changes_only_by_ema() -> None:
    backbone = tiny_vit(dynamic_img_size=True)
    setup_explora(backbone, ExploraConfig(unfrozen_blocks=1, lora_rank=4))
    student = DinoStudent(backbone, DINOHead(DIM, 16, 16, 8)).train()
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss_fn = DINOLoss(16)
    crops = [torch.randn(2, 3, 28, 28), torch.randn(2, 3, 28, 28), torch.randn(2, 3, 14, 14)]
    with torch.no_grad():
        t_logits = teacher(crops[:2])
    loss = loss_fn(student(crops), t_logits, 0.04)
    # a plain teacher forward with grad enabled still gives no graph to the teacher
    loss = loss + 0.0 * teacher(crops[:2]).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "teacher must never get gradients"
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[n]), f"{n} changed by a student optimizer step"
    ema_update_(teacher, student, momentum=0.9)
    s_params = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        expected = 0.9 * teacher_before[n] + 0.1 * s_params[n].detach()
        if s_params[n].requires_grad:
            torch.testing.assert_close(p, expected, msg=f"{n} is not the EMA of the student")
        else:
            assert torch.equal(p, teacher_before[n]), f"frozen {n} must not move"


# ---------------------------------------------------------------- schedules and crops


def test_schedules_per_iteration() -> None:
    cfg = ExploraConfig(lr=1e-3, min_lr=1e-5, lr_warmup_frac=0.2, teacher_temp_warmup_frac=0.5)
    s = build_schedules(cfg, 10)
    assert len(s.lr) == len(s.teacher_momentum) == len(s.teacher_temp) == 10
    assert s.lr[0] == 0.0 and s.lr.max() == pytest.approx(1e-3) and s.lr[-1] < 1e-3
    assert s.teacher_momentum[0] == pytest.approx(0.996)
    assert np.all(np.diff(s.teacher_momentum) >= 0) and s.teacher_momentum[-1] <= 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[-1] == pytest.approx(0.07)
    wd = build_schedules(ExploraConfig(), 100).weight_decay  # DINO: cosine from 0.04 up to 0.4
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-3), (wd[0], wd[-1])
    assert np.all(np.diff(wd) >= 0), "weight decay must only rise"


def test_student_drop_path_is_stochastic_in_train_mode_only() -> None:
    torch.manual_seed(0)
    model = tiny_vit(depth=4)
    rates = set_drop_path(model, 0.3)
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3]), rates
    assert model.blocks[3].drop_path1.drop_prob == pytest.approx(0.3)
    x = torch.rand(4, 3, 28, 28)
    model.train()
    assert not torch.allclose(model(x), model(x)), "drop-path must make train-mode forwards differ"
    teacher = make_teacher(model)
    torch.testing.assert_close(teacher(x), teacher(x), msg="the eval-mode teacher must be deterministic")


def test_crop_sizes_are_patch_multiples() -> None:
    g, loc, patch = resolve_crop_sizes(tiny_vit(img_size=56, dynamic_img_size=True), ExploraConfig())
    assert (g, patch) == (56, 14) and loc % 14 == 0 and loc < g
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        resolve_crop_sizes(tiny_vit(dynamic_img_size=True), ExploraConfig(local_crop_size=20))
    g, loc, _ = resolve_crop_sizes(tiny_vit(), ExploraConfig())
    assert g == loc == 28, "a fixed-size backbone gets every crop at its input size"


# ---------------------------------------------------------------- the loop


def _write_jpegs(tmp_path: Path, n: int) -> list[str]:
    uris = []
    for i, im in enumerate(_synthetic_images(n)):
        path = tmp_path / f"img_{i:02d}.jpg"
        im.save(path, format="JPEG", quality=90)
        uris.append(str(path))
    return uris


def _open(uri: str) -> Image.Image:
    with Image.open(uri) as im:
        return im.convert("RGB")


def test_loss_falls_and_result_is_a_plain_state_dict(tmp_path: Path) -> None:
    """Fixed teacher (momentum 1) and fixed center isolate the student's learning: H(t, s) must fall."""
    uris = _write_jpegs(tmp_path, 8)
    torch.manual_seed(0)
    backbone = tiny_vit(depth=2, dynamic_img_size=True)
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = _tiny_cfg(
        max_steps=10, lr=3e-3, min_lr=3e-3, lr_warmup_frac=0.0, teacher_momentum=1.0, center_momentum=1.0,
        warmup_teacher_temp=0.04, teacher_temp=0.04, export_weights="student",
    )  # fmt: skip
    steps_seen: list[dict] = []
    result = run_explora(backbone, uris, cfg, load_image=_open, on_step=steps_seen.append)
    curve = result.report["loss_curve"]
    assert len(curve) == 10 and len(steps_seen) == 10
    assert np.mean(curve[-3:]) < 0.85 * np.mean(curve[:3]), f"loss did not fall: {curve}"
    assert list(result.state_dict) == list(original), "merged keys must equal the input backbone's keys"
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, original[k]), f"run_explora modified the caller's backbone at {k}"
    assert not torch.equal(result.state_dict["blocks.1.mlp.fc1.weight"], original["blocks.1.mlp.fc1.weight"])
    assert torch.equal(result.state_dict["patch_embed.proj.weight"], original["patch_embed.proj.weight"])
    report = result.report
    for key in (
        "trainable_params",
        "total_params",
        "trainable_pct",
        "blocks_unfrozen",
        "lora_blocks",
        "rank",
    ):
        assert key in report, f"report lacks {key}"
    assert report["images_used"] == 8 and report["steps"] == 10 and report["seconds"] > 0
    # DINO's recipe: weight decay rises, the head's last layer is frozen first, the student drops paths
    wd = [s["weight_decay"] for s in steps_seen]
    assert wd[0] == pytest.approx(0.04) and wd[-1] > 0.3 and wd == sorted(wd), wd
    assert [s["last_layer_frozen"] for s in steps_seen] == [True] + [False] * 9
    assert report["freeze_last_layer_steps"] == 1 and report["drop_path_rates"] == pytest.approx([0.0, 0.1])
    assert "iBOT" in report["objective"]


@pytest.mark.parametrize("name", ["eva_dinov3", "vit_fixed_size"])
def test_run_explora_on_eva_and_fixed_size_vit(name: str) -> None:
    backbone = tiny_eva() if name == "eva_dinov3" else tiny_vit(depth=2)
    images = {f"mem://{i}": im for i, im in enumerate(_synthetic_images(4))}
    result = run_explora(
        backbone, list(images), _tiny_cfg(max_steps=2, batch_size=2), load_image=images.__getitem__
    )
    fresh = copy.deepcopy(backbone)
    fresh.load_state_dict(result.state_dict, strict=True)
    assert result.report["steps"] == 2 and all(np.isfinite(result.report["loss_curve"]))


def test_disabled_passes_base_weights_through() -> None:
    backbone = tiny_vit()
    result = run_explora(backbone, [], ExploraConfig(enabled=False))
    assert result.report["enabled"] is False and result.report["steps"] == 0
    for k, v in backbone.state_dict().items():
        assert torch.equal(result.state_dict[k], v), f"{k} changed although ExPLoRA is disabled"


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        run_explora(tiny_vit(dynamic_img_size=True), [str(bad)], _tiny_cfg(max_steps=1), load_image=_open)


def test_default_loader_reads_jpegs(tmp_path: Path) -> None:
    pytest.importorskip("roadwork_core.data.images", reason="data layer not present")
    uris = _write_jpegs(tmp_path, 2)
    result = run_explora(tiny_vit(depth=2, dynamic_img_size=True), uris, _tiny_cfg(max_steps=1, batch_size=2))
    assert result.report["images_used"] == 2 and np.isfinite(result.report["loss_curve"][0])


def test_killed_run_resumes_from_last_epoch_and_ends_identical(tmp_path: Path) -> None:
    """A run that dies in epoch 3 resumes from epoch 2's checkpoint and ends bit-identical to a run
    that was never interrupted (same loss curve, same merged weights)."""
    uris = _write_jpegs(tmp_path, 8)
    cfg = _tiny_cfg(epochs=3, batch_size=4, lr=1e-3)
    torch.manual_seed(0)
    backbone = tiny_vit(depth=2, dynamic_img_size=True)
    whole = run_explora(backbone, uris, cfg, load_image=_open, checkpoint_dir=tmp_path / "whole")
    assert whole.report["resumed_from_epoch"] is None and whole.report["epochs"] == 3

    class Crash(RuntimeError):
        pass

    def crash_in_epoch_3(row: dict) -> None:
        if row["step"] == 4:  # 2 steps per epoch: the first step of epoch 3
            raise Crash

    ckpt = tmp_path / "killed"
    with pytest.raises(Crash):
        run_explora(backbone, uris, cfg, load_image=_open, on_step=crash_in_epoch_3, checkpoint_dir=ckpt)
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 2, "epoch 2 was not checkpointed"
    resumed = run_explora(backbone, uris, cfg, load_image=_open, checkpoint_dir=ckpt)
    assert resumed.report["resumed_from_epoch"] == 2
    assert resumed.report["loss_curve"] == whole.report["loss_curve"], "resume did not replay epoch 3"
    for key, value in whole.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), f"resumed weights differ at {key}"

    other = run_explora(backbone, uris, _tiny_cfg(epochs=3, batch_size=4, lr=2e-3), load_image=_open,
                        checkpoint_dir=ckpt)  # fmt: skip
    assert other.report["resumed_from_epoch"] is None, "a checkpoint of another config was resumed"


def test_images_replaced_under_the_same_names_are_not_resumed_as_the_same_run(tmp_path: Path) -> None:
    """Pool images replaced by other pictures under the same file names: the finished checkpoint of the old
    images was resumed (resumed_from_epoch 1, the weights unchanged), so nothing was trained on the new
    ones. The fingerprint counts the images' bytes."""
    uris = _write_jpegs(tmp_path, 8)
    cfg = _tiny_cfg(epochs=1, batch_size=4, lr=1e-3)
    torch.manual_seed(0)
    backbone = tiny_vit(depth=2, dynamic_img_size=True)
    first = run_explora(backbone, uris, cfg, load_image=_open, checkpoint_dir=tmp_path / "ckpt")
    same = run_explora(backbone, uris, cfg, load_image=_open, checkpoint_dir=tmp_path / "ckpt")
    assert same.report["resumed_from_epoch"] == 1, "an unchanged run resumes its finished epoch"
    Path(uris[0]).write_bytes(Path(uris[1]).read_bytes())  # another picture under uris[0]'s name
    changed = run_explora(backbone, uris, cfg, load_image=_open, checkpoint_dir=tmp_path / "ckpt")
    assert changed.report["resumed_from_epoch"] is None, "a run on other image bytes resumed the old one"
    assert first.report["epochs"] == changed.report["epochs"] == 1


def test_a_data_parallel_explora_job_checkpoints_and_a_rerun_resumes(tmp_path: Path) -> None:
    """The torchrun job (roadwork_core.training.ddp_jobs) carries the step's checkpoint folder: rank 0
    checkpoints each finished epoch and rerunning the job resumes, as the one-process path does (before, a
    killed multi-GPU ExPLoRA started again from nothing). Run here as rank 0 of 1, in this process."""
    import dataclasses

    from roadwork_core.models.backbone import BackboneConfig, create_backbone
    from roadwork_core.training.ddp_jobs import run_job, write_explora_job
    from roadwork_core.training.distributed import World

    uris = _write_jpegs(tmp_path, 8)
    backbone_cfg = BackboneConfig(name="vit_test_tiny")
    torch.manual_seed(0)
    backbone = create_backbone(backbone_cfg)
    job = tmp_path / "job"
    job.mkdir()
    ckpt = tmp_path / "ckpt"
    cfg = _tiny_cfg(epochs=1, batch_size=4, lr=1e-3)
    write_explora_job(job, backbone, dataclasses.asdict(backbone_cfg), uris, cfg, checkpoint_dir=ckpt)
    first = run_job(job, World(), torch.device("cpu"))
    assert first["resumed_from_epoch"] is None
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1, "rank 0 wrote no checkpoint"
    again = run_job(job, World(), torch.device("cpu"))
    assert again["resumed_from_epoch"] == 1, "a rerun of the job did not resume its finished epoch"


def test_explora_runs_its_forwards_in_the_gpu_resources_precision(tmp_path: Path) -> None:
    """`gpu.precision: bf16-mixed` reaches ExPLoRA (before, it trained in fp32 whatever the setting, at
    a fraction of a GPU's bf16 throughput); the merged weights stay fp32."""
    uris = _write_jpegs(tmp_path, 8)
    cfg = _tiny_cfg(epochs=1, batch_size=4, lr=1e-3)
    torch.manual_seed(0)
    backbone = tiny_vit(depth=2, dynamic_img_size=True)
    fp32 = run_explora(backbone, uris, cfg, load_image=_open)
    bf16 = run_explora(backbone, uris, cfg, load_image=_open, precision="bf16-mixed")
    assert (fp32.report["precision"], bf16.report["precision"]) == ("fp32", "bf16-mixed")
    assert np.isfinite(bf16.report["loss_curve"]).all()
    assert bf16.report["loss_curve"] != fp32.report["loss_curve"], "the forwards did not run in bf16"
    assert {v.dtype for v in bf16.state_dict.values()} == {torch.float32}
    with pytest.raises(ValueError, match="fp16-mixed' needs a CUDA device"):
        run_explora(backbone, uris, cfg, load_image=_open, precision="fp16-mixed")


def test_explora_crops_are_the_same_whatever_the_number_of_dataloader_workers(tmp_path: Path) -> None:
    """Images are decoded and cropped by a DataLoader (workers keep a GPU fed); each image's crops are
    seeded by (epoch, image), so two worker processes train exactly what the training process alone does."""
    uris = _write_jpegs(tmp_path, 8)
    torch.manual_seed(0)
    backbone = tiny_vit(depth=2, dynamic_img_size=True)
    alone = run_explora(backbone, uris, _tiny_cfg(epochs=2, batch_size=4, lr=1e-3), load_image=_open)
    workers = run_explora(
        backbone, uris, _tiny_cfg(epochs=2, batch_size=4, lr=1e-3, num_workers=2), load_image=_open
    )
    assert workers.report["loss_curve"] == alone.report["loss_curve"]
    for key, value in alone.state_dict.items():
        assert torch.equal(workers.state_dict[key], value), key
