"""The annotation web app (Gradio): ``ibisagent app``.

Open a 2D image (PNG/JPEG/DICOM) or a volume (NIfTI, NRRD, MetaImage or a DICOM series, with a slice slider and
window presets), type a query, press "Run agent" and watch the episode step by step (overlay, green/red click
markers, the agent's reasoning, IoU when a ground-truth mask is given); then click the image to add
positive/negative points, undo, reset, let the agent continue from your clicks, and download the mask (PNG or NIfTI
in the source geometry). A volume is segmented in 3D by default: the 3D agent (a volume policy), clicks on any slice
that re-propagate through the volume, the 3D mask on every slice plus a three-plane projection of it, and the label
volume as NIfTI (or DICOM SEG for a DICOM series).

The logic lives in :class:`ibisagent.ui.annotator.Annotator`; this module only wires it to Gradio components.
"""


from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ibisagent.runtime import SegmenterHub, default_segmenter, find_bundled_dir
from ibisagent.segmenters.base import SegmenterUnavailable
from ibisagent.ui.annotator import WINDOW_CHOICES, Annotator, default_volume_policy

__all__ = ["AppConfig", "ExampleCase", "build_app", "bundled_examples", "display_factor", "display_scaled"]

IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".gz", ".nrrd", ".mha"]
#: errors shown to the user as a message (bad input, a backend that cannot run here, an unknown name)
_USER_ERRORS = (ValueError, SegmenterUnavailable, KeyError)
CLICK_POSITIVE = "Positive (add)"
CLICK_NEGATIVE = "Negative (remove)"
MODE_3D = "3D: one mask through the volume"
MODE_2D = "2D: the shown slice only"
FORMAT_PNG, FORMAT_NIFTI, FORMAT_SEG = "PNG", "NIfTI (.nii.gz)", "DICOM SEG (.dcm)"


class ExampleCase:
    """A bundled example: label shown in the dropdown, image path, mask path, query."""

    def __init__(self, label: str, image: Path, mask: Path | None, query: str, is_3d: bool = False) -> None:
        self.label, self.image, self.mask, self.query, self.is_3d = label, image, mask, query, is_3d


def bundled_examples(folder: str | Path | None = None, limit: int = 24) -> list[ExampleCase]:
    """Examples from a manifest folder (default: :func:`ibisagent.runtime.find_bundled_dir`); [] when none."""
    from ibisagent.io import load_manifest

    root = find_bundled_dir(folder)
    if root is None:
        return []
    try:
        cases = load_manifest(root, include_3d=True)
    except ValueError:
        return []
    out = []
    for c in cases[:limit]:
        label = f"{c.id}: {c.query}"
        out.append(ExampleCase(label, c.image, c.mask, c.query, c.is_3d))
    return out


class AppConfig:
    """What the app offers: segmenters, policies, defaults and examples."""

    def __init__(self, segmenters: list[str] | None = None, policies: list[str] | None = None,
                 segmenter: str | None = None, policy: str | None = None,
                 examples: list[ExampleCase] | None = None, max_steps: int = 20,
                 volume_policies: list[str] | None = None, volume_policy: str | None = None,
                 max_voxels: int | None = None) -> None:
        from ibisagent.policies.base import default_policy, list_policies
        from ibisagent.runtime import MAX_VOLUME_VOXELS
        from ibisagent.segmenters.base import list_segmenters

        self.segmenters = segmenters or list(list_segmenters())
        self.policies = policies or list(list_policies(volume=False))  # the app's 2D flow
        self.segmenter = segmenter or default_segmenter()
        if self.segmenter not in self.segmenters:
            self.segmenters.insert(0, self.segmenter)
        # the learned policy works on a user's own image; the oracle needs a ground-truth mask
        self.policy = policy or default_policy()
        if self.policy not in self.policies:
            self.policies.insert(0, self.policy)
        # the 3D flow: volume policies (compact-3d works from the query; oracle-3d / challenge-3d need a label map)
        self.volume_policies = volume_policies or list(list_policies(volume=True))
        self.volume_policy = volume_policy or default_volume_policy()
        if self.volume_policy not in self.volume_policies:
            self.volume_policies.insert(0, self.volume_policy)
        self.examples = bundled_examples() if examples is None else examples
        self.max_steps = max_steps
        self.max_voxels = int(max_voxels or MAX_VOLUME_VOXELS)


#: small images are shown enlarged (nearest neighbour, integer factor) until their long side reaches this
DISPLAY_MIN_SIDE = 480


def display_factor(ann: Annotator) -> int:
    """Integer enlargement of the shown image (1 for images whose long side is at least DISPLAY_MIN_SIDE)."""
    if not ann.has_image:
        return 1
    side = max(ann.image.shape[:2])
    return max(1, -(-DISPLAY_MIN_SIDE // side)) if side < DISPLAY_MIN_SIDE else 1


def display_scaled(image: Any, k: int) -> Any:
    """``image`` enlarged k times by pixel repetition (click coordinates map back by integer division)."""
    return image if k == 1 else image.repeat(k, axis=0).repeat(k, axis=1)


def _view(ann: Annotator) -> tuple[Any, str, str, Any, Any]:
    """What the page shows of ``ann``: the (enlarged) overlay, the status line, the agent's log, the 3D mask's
    projection (shown for a volume in 3D only) and the slice slider (it follows the agent's slice in 3D)."""
    import gradio as gr

    proj = ann.projection() if ann.has_image else None
    proj_update = gr.update(value=proj, visible=proj is not None)
    if not ann.has_image:
        return None, "No image loaded.", ann.log_text(), proj_update, _slider_update(ann)
    return (display_scaled(ann.render(), display_factor(ann)), ann.status(), ann.log_text(), proj_update,
            _slider_update(ann))


def _slider_update(ann: Annotator) -> Any:
    """The slice slider: shown with the volume's range for a volume, hidden for a 2D image."""
    import gradio as gr

    if ann.is_volume:
        return gr.update(visible=True, minimum=0, maximum=ann.n_slices - 1, value=ann.slice_index, step=1)
    return gr.update(visible=False)


def _policy_update(ann: Annotator, cfg: AppConfig) -> Any:
    """The policy dropdown: the volume policies for a volume in 3D, else the 2D ones."""
    import gradio as gr

    if ann.is_3d:
        return gr.update(choices=cfg.volume_policies, value=ann.volume_policy)
    return gr.update(choices=cfg.policies, value=ann.policy_name)


def _fail(exc: Exception) -> NoReturn:
    """Show a user error as a Gradio message (a KeyError's bare message, not its repr)."""
    import gradio as gr

    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    raise gr.Error(msg)


class _Handlers:
    """The app's event handlers. Each takes the session's :class:`Annotator` (None on a new page: made with the chosen
    segmenter and policy), acts on it, and returns it with the new view; user errors become Gradio messages."""

    def __init__(self, cfg: AppConfig, hub: SegmenterHub) -> None:
        self.cfg, self.hub = cfg, hub
        self.examples = {e.label: e for e in cfg.examples}

    def state_of(self, ann: Annotator | None, segmenter: str, policy: str) -> Annotator:
        """The session's annotator, made on first use (volumes in 3D, the page's default mode)."""
        if ann is None:
            if policy in self.cfg.volume_policies and policy not in self.cfg.policies:
                policy = self.cfg.policy
            ann = Annotator(self.hub, segmenter or self.cfg.segmenter, policy or self.cfg.policy,
                            max_steps=self.cfg.max_steps, volume_mode="3d", volume_policy=self.cfg.volume_policy,
                            max_voxels=self.cfg.max_voxels)
        return ann

    def on_example(self, label: str, ann: Annotator | None, segmenter: str, policy: str, window: str):
        ann = self.state_of(ann, segmenter, policy)
        ex = self.examples.get(label)
        if ex is None:
            import gradio as gr

            return (ann, *_view(ann), gr.update(), _policy_update(ann, self.cfg))
        try:
            ann.open(ex.image, mask_path=ex.mask, query=ex.query, window=window)
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann), ex.query, _policy_update(ann, self.cfg))

    def on_upload(self, paths: list[str] | str | None, ann: Annotator | None, segmenter: str, policy: str,
                  window: str):
        ann = self.state_of(ann, segmenter, policy)
        if isinstance(paths, str):
            paths = [paths]
        if paths:
            try:
                ann.open_files(paths, window=window)
            except _USER_ERRORS as exc:
                _fail(exc)
        return (ann, *_view(ann), _policy_update(ann, self.cfg))

    def on_mode(self, mode: str, ann: Annotator | None, segmenter: str, policy: str):
        """The volume mode radio: 3D (one mask through the volume) or 2D (the shown slice)."""
        ann = self.state_of(ann, segmenter, policy)
        try:
            ann.set_volume_mode("2d" if mode == MODE_2D else "3d")
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann), _policy_update(ann, self.cfg))

    def on_mask(self, path: str | None, ann: Annotator | None, segmenter: str, policy: str):
        ann = self.state_of(ann, segmenter, policy)
        if ann.has_image:
            try:
                ann.set_mask(path)
            except _USER_ERRORS as exc:
                _fail(exc)
        return (ann, *_view(ann))

    def on_slice(self, index: float, ann: Annotator | None, segmenter: str, policy: str):
        ann = self.state_of(ann, segmenter, policy)
        try:
            ann.set_slice(int(index))
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann))

    def on_window(self, window: str, ann: Annotator | None, segmenter: str, policy: str):
        ann = self.state_of(ann, segmenter, policy)
        try:
            ann.set_window(window)
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann))

    def on_segmenter(self, name: str, ann: Annotator | None, policy: str):
        ann = self.state_of(ann, name, policy)
        try:
            ann.set_segmenter(name)
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann))

    def _run(self, query: str, policy: str, segmenter: str, ann: Annotator | None,
             from_current: bool, progress: Any = None) -> Iterator[tuple]:
        """Run the agent (from scratch or from the current clicks), yielding the view after every step. For a volume
        in 3D, ``progress`` (a ``gr.Progress``) shows the slices encoded so far while a step runs."""
        ann = self.state_of(ann, segmenter, policy)
        vol = ann.vol3d if ann.is_3d else None
        try:
            ann.set_segmenter(segmenter)
            if vol is not None and progress is not None:
                vol.on_slice = _slice_progress(progress, vol.stack.depth)
            steps = ann.run_agent(query, policy, from_current=from_current)
            yield (ann, *_view(ann))
            for _ in steps:
                yield (ann, *_view(ann))
        except _USER_ERRORS as exc:
            _fail(exc)
        finally:
            if vol is not None:
                vol.on_slice = None

    def on_run(self, query: str, policy: str, segmenter: str, ann: Annotator | None, progress: Any = None):
        yield from self._run(query, policy, segmenter, ann, False, progress)

    def on_continue(self, query: str, policy: str, segmenter: str, ann: Annotator | None, progress: Any = None):
        yield from self._run(query, policy, segmenter, ann, True, progress)

    def click(self, mode: str, ann: Annotator | None, segmenter: str, policy: str, index: Any):
        """A click on the shown image at ``index`` (display pixels; mapped back to image pixels)."""
        ann = self.state_of(ann, segmenter, policy)
        try:
            k = display_factor(ann)
            x, y = (int(v) // k for v in index[:2])
            ann.click(x, y, positive=mode != CLICK_NEGATIVE)
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann))

    def on_undo(self, ann: Annotator | None, segmenter: str, policy: str):
        ann = self.state_of(ann, segmenter, policy)
        try:
            ann.undo()
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann))

    def on_reset(self, ann: Annotator | None, segmenter: str, policy: str):
        ann = self.state_of(ann, segmenter, policy)
        try:
            ann.reset()
        except _USER_ERRORS as exc:
            _fail(exc)
        return (ann, *_view(ann))

    def on_export(self, fmt: str, ann: Annotator | None, segmenter: str, policy: str):
        ann = self.state_of(ann, segmenter, policy)
        try:
            path = ann.export({FORMAT_NIFTI: "nifti", FORMAT_SEG: "dicom-seg"}.get(fmt, "png"))
        except _USER_ERRORS as exc:
            _fail(exc)
        return str(path)


@dataclass
class _Widgets:
    """The app's Gradio components (see :func:`_layout`)."""

    state: Any
    upload: Any
    example: Any
    query: Any
    policy: Any
    segmenter: Any
    run_btn: Any
    cont_btn: Any
    mode: Any
    undo_btn: Any
    reset_btn: Any
    fmt: Any
    export_btn: Any
    download: Any
    mask_up: Any
    slider: Any
    window: Any
    vmode: Any
    canvas: Any
    status: Any
    proj: Any
    log: Any


def _layout(cfg: AppConfig, examples: list[str], first_example: str | None) -> _Widgets:
    """Lay out the page inside the current ``gr.Blocks``: controls on the left (opening an image first, visible
    without scrolling), the canvas, status and log on the right."""
    import gradio as gr

    gr.Markdown("## ibisagent: type what to segment, watch the agent click, fix it with your own clicks")
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1, min_width=340):
            # where to open an image comes first: visible without scrolling (1400x1000 and up)
            upload = gr.File(label="Open your own image: PNG/JPEG/DICOM, a NIfTI volume, or all files of a "
                                   "DICOM series", file_types=IMAGE_TYPES, file_count="multiple",
                             type="filepath", elem_id="upload", height=110)
            example = gr.Dropdown(choices=examples, value=first_example, label="... or a bundled example",
                                  elem_id="example", interactive=True)
            query = gr.Textbox(label="Query", placeholder="segment the tumor", elem_id="query")
            with gr.Row():
                policy = gr.Dropdown(choices=cfg.policies, value=cfg.policy, label="Policy", elem_id="policy")
                segmenter = gr.Dropdown(choices=cfg.segmenters, value=cfg.segmenter, label="Segmenter",
                                        elem_id="segmenter")
            with gr.Row():
                run_btn = gr.Button("Run agent", variant="primary", elem_id="run")
                cont_btn = gr.Button("Agent: continue from my clicks", elem_id="continue")
            mode = gr.Radio([CLICK_POSITIVE, CLICK_NEGATIVE], value=CLICK_POSITIVE, label="Click adds",
                            elem_id="mode")
            with gr.Row():
                undo_btn = gr.Button("Undo", elem_id="undo")
                reset_btn = gr.Button("Reset", elem_id="reset")
            with gr.Row():
                fmt = gr.Radio([FORMAT_PNG, FORMAT_NIFTI, FORMAT_SEG], value=FORMAT_PNG,
                               label="Mask format (a volume in 3D: NIfTI / DICOM SEG write the label volume)",
                               elem_id="fmt")
                export_btn = gr.Button("Export mask", elem_id="export")
            download = gr.File(label="Mask file", interactive=False, elem_id="download", height=90)
            with gr.Accordion("Ground truth, volume slice and window", open=True):
                mask_up = gr.File(label="Ground-truth mask (optional: enables IoU and the oracle policy)",
                                  file_types=IMAGE_TYPES + [".npy"], type="filepath", elem_id="mask-upload",
                                  height=120)
                slider = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False, elem_id="slice")
                vmode = gr.Radio([MODE_3D, MODE_2D], value=MODE_3D, label="Segment a volume in", elem_id="vmode")
                window = gr.Dropdown(choices=list(WINDOW_CHOICES), value="auto", label="Window preset",
                                     elem_id="window")
        with gr.Column(scale=2):
            canvas = gr.Image(label="Click the image to add a point", type="numpy", format="png",
                              interactive=False, elem_id="canvas", buttons=["fullscreen"], height=560)
            status = gr.Markdown("No image loaded.", elem_id="status")
            proj = gr.Image(label="3D mask: maximum projections (slice plane, along rows, along columns; blue line: "
                                  "the shown slice)", type="numpy", format="png", interactive=False,
                            elem_id="projection", visible=False, height=190, buttons=[])
            log = gr.Textbox(label="Agent reasoning and steps", lines=12, max_lines=30, interactive=False,
                             elem_id="log")
    return _Widgets(state, upload, example, query, policy, segmenter, run_btn, cont_btn, mode, undo_btn, reset_btn,
                    fmt, export_btn, download, mask_up, slider, window, vmode, canvas, status, proj, log)


def _slice_progress(progress: Any, depth: int) -> Any:
    """An ``on_slice(phase, z)`` that shows the slices encoded so far on ``progress`` (``gr.Progress``)."""
    done = {"encode": 0}

    def report(phase: str, z: int) -> None:
        if phase == "encode":
            done["encode"] += 1
            progress((min(done["encode"], depth), depth), desc=f"encoding slices (slice {z})", unit="slices")

    return report


def _wire(demo: Any, w: _Widgets, h: _Handlers, first_example: str | None) -> None:
    """Connect the components' events to the handlers (inside the ``gr.Blocks`` ``demo``)."""
    import gradio as gr

    def on_click(mode: str, ann: Annotator | None, segmenter: str, policy: str, evt: gr.SelectData):
        return h.click(mode, ann, segmenter, policy, evt.index)

    shown = [w.state, w.canvas, w.status, w.log, w.proj, w.slider]
    example_inputs = [w.example, w.state, w.segmenter, w.policy, w.window]
    w.example.change(h.on_example, example_inputs, [*shown, w.query, w.policy])
    if first_example is not None:  # the dropdown shows the first example: open it with the page
        demo.load(h.on_example, example_inputs, [*shown, w.query, w.policy])
    w.upload.change(h.on_upload, [w.upload, w.state, w.segmenter, w.policy, w.window], [*shown, w.policy])
    w.vmode.change(h.on_mode, [w.vmode, w.state, w.segmenter, w.policy], [*shown, w.policy])
    w.mask_up.change(h.on_mask, [w.mask_up, w.state, w.segmenter, w.policy], shown)
    w.slider.release(h.on_slice, [w.slider, w.state, w.segmenter, w.policy], shown)
    w.window.change(h.on_window, [w.window, w.state, w.segmenter, w.policy], shown)
    w.segmenter.change(h.on_segmenter, [w.segmenter, w.state, w.policy], shown)
    def on_run(query: str, policy: str, segmenter: str, ann: Annotator | None, progress=gr.Progress()):  # noqa: B008
        yield from h.on_run(query, policy, segmenter, ann, progress)

    def on_continue(query: str, policy: str, segmenter: str, ann: Annotator | None,
                    progress=gr.Progress()):  # noqa: B008
        yield from h.on_continue(query, policy, segmenter, ann, progress)

    w.run_btn.click(on_run, [w.query, w.policy, w.segmenter, w.state], shown)
    w.cont_btn.click(on_continue, [w.query, w.policy, w.segmenter, w.state], shown)
    w.canvas.select(on_click, [w.mode, w.state, w.segmenter, w.policy], shown)
    w.undo_btn.click(h.on_undo, [w.state, w.segmenter, w.policy], shown)
    w.reset_btn.click(h.on_reset, [w.state, w.segmenter, w.policy], shown)
    w.export_btn.click(h.on_export, [w.fmt, w.state, w.segmenter, w.policy], w.download)


def build_app(config: AppConfig | None = None, hub: SegmenterHub | None = None) -> Any:
    """The Gradio Blocks app (not launched): :func:`_layout` of the components, :class:`_Handlers` for the events,
    :func:`_wire` between them."""
    import gradio as gr

    cfg = config or AppConfig()
    h = _Handlers(cfg, hub or SegmenterHub())
    first_example = next((e.label for e in cfg.examples if not e.is_3d), next(iter(h.examples), None))
    with gr.Blocks(title="ibisagent: interactive agent segmentation", analytics_enabled=False) as demo:
        w = _layout(cfg, list(h.examples), first_example)
        _wire(demo, w, h, first_example)
    return demo
