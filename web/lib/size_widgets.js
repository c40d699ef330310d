// Which size widgets a node shows for an `image_size` choice, and the label that tells the preset's pixels.
// Pure functions: no ComfyUI imports, unit-tested under Node (tests/js/size_widgets.test.mjs).

/** fal's image_size presets as (width, height); must equal IMAGE_SIZE_PRESETS in pipeline/sizes.py. */
export const IMAGE_SIZE_PRESETS = Object.freeze({
  square_hd: [1024, 1024],
  square: [512, 512],
  portrait_4_3: [768, 1024],
  portrait_16_9: [576, 1024],
  landscape_4_3: [1024, 768],
  landscape_16_9: [1024, 576],
});

/** Node types that carry the shared image_size / width / height widgets. */
export const SIZED_NODE_TYPES = Object.freeze(["SDXLCNImg2Img", "SDXLCNFalImg2Img"]);

export const IMAGE_SIZE_WIDGET = "image_size";
export const SIZE_WIDGETS = Object.freeze(["width", "height"]);

/** True when `width`/`height` matter (and so should be shown) for this image_size value. */
export function sizeWidgetsVisible(imageSize) {
  return imageSize === "custom";
}

/** [width, height] of a preset name, or null for "none", "custom" or anything unknown. */
export function presetSize(imageSize) {
  return Object.prototype.hasOwnProperty.call(IMAGE_SIZE_PRESETS, imageSize) ? [...IMAGE_SIZE_PRESETS[imageSize]] : null;
}

/** What the choice means in pixels, for the node: "1024×768", "control image size", or "" for custom. */
export function sizeHint(imageSize) {
  const size = presetSize(imageSize);
  if (size) return `${size[0]}×${size[1]}`;
  if (imageSize === "none") return "control image size";
  return "";
}

/** The label of the image_size widget: its name plus the hint, e.g. "image_size · 1024×768". */
export function imageSizeLabel(imageSize, name = IMAGE_SIZE_WIDGET) {
  const hint = sizeHint(imageSize);
  return hint ? `${name} · ${hint}` : name;
}

/** True if `label` is one this module produced for widget `name` (so it is ours to remove). */
export function isDecoratedLabel(label, name = IMAGE_SIZE_WIDGET) {
  return typeof label === "string" && label.startsWith(`${name} · `);
}
