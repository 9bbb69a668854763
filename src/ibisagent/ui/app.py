"""The annotation web app (Gradio): ``ibisagent app``.

Open a 2D image (PNG/JPEG/DICOM) or a volume (NIfTI, with a slice slider and window presets), type a query, press
"Run agent" and watch the episode step by step (overlay, green/red click markers, the agent's reasoning, IoU when a
ground-truth mask is given); then click the image to add positive/negative points, undo, reset, let the agent
continue from your clicks, and download the mask (PNG or NIfTI in the source geometry).

The logic lives in :class:`ibisagent.ui.annotator.Annotator`; this module only wires it to Gradio components.
"""


from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ibisagent.runtime import SegmenterHub, default_segmenter, find_bundled_dir
from ibisagent.segmenters.base import SegmenterUnavailable
from ibisagent.ui.annotator import WINDOW_CHOICES, Annotator

__all__ = ["AppConfig", "ExampleCase", "build_app", "bundled_examples", "display_factor", "display_scaled"]

IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".gz"]
#: errors shown to the user as a message (bad input, a backend that cannot run here, an unknown name)
_USER_ERRORS = (ValueError, SegmenterUnavailable, KeyError)
CLICK_POSITIVE = "Positive (add)"
CLICK_NEGATIVE = "Negative (remove)"


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
                 examples: list[ExampleCase] | None = None, max_steps: int = 20) -> None:
        from ibisagent.policies.base import default_policy, list_policies
        from ibisagent.segmenters.base import list_segmenters

        self.segmenters = segmenters or list(list_segmenters())
        self.policies = policies or list(list_policies())
        self.segmenter = segmenter or default_segmenter()
        if self.segmenter not in self.segmenters:
            self.segmenters.insert(0, self.segmenter)
        # the learned policy works on a user's own image; the oracle needs a ground-truth mask
        self.policy = policy or default_policy()
        if self.policy not in self.policies:
            self.policies.insert(0, self.policy)
        self.examples = bundled_examples() if examples is None else examples
        self.max_steps = max_steps


#: small images are shown enlarged (nearest neighbour, integer factor) until their long side reaches this
DISPLAY_MIN_SIDE = 480


def display_factor(ann: Annotator) -> int:
    """Integer enlargement of the shown image (1 for images whose long side is at least DISPLAY_MIN_SIDE)."""
    if ann.loaded is None:
        return 1
    side = max(ann.image.shape[:2])
    return max(1, -(-DISPLAY_MIN_SIDE // side)) if side < DISPLAY_MIN_SIDE else 1


def display_scaled(image: Any, k: int) -> Any:
    """``image`` enlarged k times by pixel repetition (click coordinates map back by integer division)."""
    return image if k == 1 else image.repeat(k, axis=0).repeat(k, axis=1)


def build_app(config: AppConfig | None = None, hub: SegmenterHub | None = None) -> Any:
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    cfg = config or AppConfig()
    hub = hub or SegmenterHub()
    examples = {e.label: e for e in cfg.examples}
    first_example = next((e.label for e in cfg.examples if not e.is_3d), next(iter(examples), None))

    def new_state(segmenter: str, policy: str) -> Annotator:
        return Annotator(hub, segmenter or cfg.segmenter, policy or cfg.policy, max_steps=cfg.max_steps)

    def state_of(ann: Annotator | None, segmenter: str, policy: str) -> Annotator:
        if ann is None:
            ann = new_state(segmenter, policy)
        return ann

    def view(ann: Annotator) -> tuple[Any, str, str]:
        if ann.loaded is None:
            return None, "No image loaded.", ann.log_text()
        return display_scaled(ann.render(), display_factor(ann)), ann.status(), ann.log_text()

    def slider_update(ann: Annotator) -> Any:
        if ann.is_volume:
            return gr.update(visible=True, minimum=0, maximum=ann.n_slices - 1, value=ann.slice_index, step=1)
        return gr.update(visible=False)

    def fail(exc: Exception) -> None:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        raise gr.Error(msg)

    # --- handlers --------------------------------------------------------------------------------------------
    def on_example(label: str, ann: Annotator | None, segmenter: str, policy: str, window: str):
        ann = state_of(ann, segmenter, policy)
        ex = examples.get(label)
        if ex is None:
            return (ann, *view(ann), gr.update(), slider_update(ann))
        try:
            ann.open(ex.image, mask_path=ex.mask, query=ex.query, window=window)
        except _USER_ERRORS as exc:
            fail(exc)
        return (ann, *view(ann), ex.query, slider_update(ann))

    def on_upload(paths: list[str] | str | None, ann: Annotator | None, segmenter: str, policy: str, window: str):
        ann = state_of(ann, segmenter, policy)
        if isinstance(paths, str):
            paths = [paths]
        if paths:
            try:
                ann.open_files(paths, window=window)
            except _USER_ERRORS as exc:
                fail(exc)
        return (ann, *view(ann), slider_update(ann))

    def on_mask(path: str | None, ann: Annotator | None, segmenter: str, policy: str):
        ann = state_of(ann, segmenter, policy)
        if ann.loaded is not None:
            try:
                ann.set_mask(path)
            except _USER_ERRORS as exc:
                fail(exc)
        return (ann, *view(ann))

    def on_slice(index: float, ann: Annotator | None, segmenter: str, policy: str):
        ann = state_of(ann, segmenter, policy)
        try:
            ann.set_slice(int(index))
        except _USER_ERRORS as exc:
            fail(exc)
        return (ann, *view(ann))

    def on_window(window: str, ann: Annotator | None, segmenter: str, policy: str):
        ann = state_of(ann, segmenter, policy)
        try:
            ann.set_window(window)
        except _USER_ERRORS as exc:
            fail(exc)
        return (ann, *view(ann))

    def on_segmenter(name: str, ann: Annotator | None, policy: str):
        ann = state_of(ann, name, policy)
        try:
            ann.set_segmenter(name)
        except _USER_ERRORS as exc:
            fail(exc)
        return (ann, *view(ann))

    def run(query: str, policy: str, segmenter: str, ann: Annotator | None,
            from_current: bool) -> Iterator[tuple]:
        ann = state_of(ann, segmenter, policy)
        try:
            ann.set_segmenter(segmenter)
            steps = ann.run_agent(query, policy, from_current=from_current)
            yield (ann, *view(ann))
            for _ in steps:
                yield (ann, *view(ann))
        except _USER_ERRORS as exc:
            fail(exc)

    def on_run(query: str, policy: str, segmenter: str, ann: Annotator | None):
        yield from run(query, policy, segmenter, ann, False)

    def on_continue(query: str, policy: str, segmenter: str, ann: Annotator | None):
        yield from run(query, policy, segmenter, ann, True)

    def on_click(mode: str, ann: Annotator | None, segmenter: str, policy: str, evt: gr.SelectData):
        ann = state_of(ann, segmenter, policy)
        try:
            k = display_factor(ann)
            x, y = (int(v) // k for v in evt.index[:2])
            ann.click(x, y, positive=mode != CLICK_NEGATIVE)
        except _USER_ERRORS as exc:
            fail(exc)
        return (ann, *view(ann))

    def on_undo(ann: Annotator | None, segmenter: str, policy: str):
        ann = state_of(ann, segmenter, policy)
        try:
            ann.undo()
        except _USER_ERRORS as exc:
            fail(exc)
        return (ann, *view(ann))

    def on_reset(ann: Annotator | None, segmenter: str, policy: str):
        ann = state_of(ann, segmenter, policy)
        try:
            ann.reset()
        except _USER_ERRORS as exc:
            fail(exc)
        return (ann, *view(ann))

    def on_export(fmt: str, ann: Annotator | None, segmenter: str, policy: str):
        ann = state_of(ann, segmenter, policy)
        try:
            path = ann.export("nifti" if fmt.startswith("NIfTI") else "png")
        except _USER_ERRORS as exc:
            fail(exc)
        return str(path)

    # --- layout ----------------------------------------------------------------------------------------------
    with gr.Blocks(title="ibisagent: interactive agent segmentation", analytics_enabled=False) as demo:
        gr.Markdown("## ibisagent: type what to segment, watch the agent click, fix it with your own clicks")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=340):
                # where to open an image comes first: visible without scrolling (1400x1000 and up)
                upload = gr.File(label="Open your own image: PNG/JPEG/DICOM, a NIfTI volume, or all files of a "
                                       "DICOM series", file_types=IMAGE_TYPES, file_count="multiple",
                                 type="filepath", elem_id="upload", height=110)
                example = gr.Dropdown(choices=list(examples), value=first_example, label="... or a bundled example",
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
                    fmt = gr.Radio(["PNG", "NIfTI (.nii.gz)"], value="PNG", label="Mask format", elem_id="fmt")
                    export_btn = gr.Button("Export mask", elem_id="export")
                download = gr.File(label="Mask file", interactive=False, elem_id="download", height=90)
                with gr.Accordion("Ground truth, volume slice and window", open=True):
                    mask_up = gr.File(label="Ground-truth mask (optional: enables IoU and the oracle policy)",
                                      file_types=IMAGE_TYPES + [".npy"], type="filepath", elem_id="mask-upload",
                                      height=120)
                    slider = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False, elem_id="slice")
                    window = gr.Dropdown(choices=list(WINDOW_CHOICES), value="auto", label="Window preset",
                                         elem_id="window")
            with gr.Column(scale=2):
                canvas = gr.Image(label="Click the image to add a point", type="numpy", format="png",
                                  interactive=False, elem_id="canvas", buttons=["fullscreen"], height=560)
                status = gr.Markdown("No image loaded.", elem_id="status")
                log = gr.Textbox(label="Agent reasoning and steps", lines=12, max_lines=30, interactive=False,
                                 elem_id="log")

        shown = [state, canvas, status, log]
        example.change(on_example, [example, state, segmenter, policy, window], [*shown, query, slider])
        if first_example is not None:  # the dropdown shows the first example: open it with the page
            demo.load(on_example, [example, state, segmenter, policy, window], [*shown, query, slider])
        upload.change(on_upload, [upload, state, segmenter, policy, window], [*shown, slider])
        mask_up.change(on_mask, [mask_up, state, segmenter, policy], shown)
        slider.release(on_slice, [slider, state, segmenter, policy], shown)
        window.change(on_window, [window, state, segmenter, policy], shown)
        segmenter.change(on_segmenter, [segmenter, state, policy], shown)
        run_btn.click(on_run, [query, policy, segmenter, state], shown)
        cont_btn.click(on_continue, [query, policy, segmenter, state], shown)
        canvas.select(on_click, [mode, state, segmenter, policy], shown)
        undo_btn.click(on_undo, [state, segmenter, policy], shown)
        reset_btn.click(on_reset, [state, segmenter, policy], shown)
        export_btn.click(on_export, [fmt, state, segmenter, policy], download)
    return demo
