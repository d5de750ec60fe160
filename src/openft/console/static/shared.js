// Lookups several pages share: the model list and the last model the user picked.

import { get } from "./api.js";

const LAST_MODEL = "openft.lastModel";

export async function loadModels() {
  return (await get("/v1/models")).data;
}

export function rememberModel(model) {
  try { localStorage.setItem(LAST_MODEL, model); } catch { /* ignore */ }
}

// The model to pre-select: the last one typed or picked here, else the first base model.
export function lastModel(models) {
  let last = "";
  try { last = localStorage.getItem(LAST_MODEL) || ""; } catch { /* ignore */ }
  if (last) return last;
  const base = models.find((m) => m.kind === "base");
  return base ? base.id : (models[0] ? models[0].id : "");
}

export async function loadFiles(purpose) {
  const q = purpose ? `?purpose=${encodeURIComponent(purpose)}` : "";
  return (await get(`/v1/files${q}`)).data;
}
