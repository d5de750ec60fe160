// The HTTP client: every request the console makes goes through here, to the
// same /v1 endpoints any other client calls. No business logic lives here.

const KEY_STORAGE = "openft.apiKey";

export function getKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lives for this page only */ }
}

// An error with the server's envelope ({"error": {message, type, param, code}})
// or a network failure (status 0).
export class ApiError extends Error {
  constructor(message, { status = 0, code = null, param = null, type = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
    this.type = type;
  }
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function errorFrom(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON */ }
  const e = body && body.error;
  if (e && e.message) {
    return new ApiError(e.message, { status: resp.status, code: e.code, param: e.param, type: e.type });
  }
  return new ApiError(`${resp.status} ${resp.statusText || "request failed"}`, { status: resp.status });
}

function unreachable(err) {
  if (err.name === "AbortError") return err;
  return new ApiError(`Cannot reach the openft server at ${location.origin} (${err.message}). Is 'openft serve' running?`,
    { status: 0, code: "unreachable" });
}

// fetch + the envelope: resolves to the parsed JSON, rejects with ApiError.
export async function request(method, path, { json, form, signal, raw = false, extraHeaders = {} } = {}) {
  const init = { method, headers: headers(extraHeaders), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw unreachable(err);
  }
  if (!resp.ok) throw await errorFrom(resp);
  return raw ? resp : resp.json();
}

export const get = (path, opts) => request("GET", path, opts);
export const post = (path, json, opts = {}) => request("POST", path, { ...opts, json });
export const del = (path, opts) => request("DELETE", path, opts);

export function qs(params) {
  const parts = [];
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  }
  return parts.length ? `?${parts.join("&")}` : "";
}

export const enc = encodeURIComponent;

export function upload(file, purpose) {
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file", file, file.name);
  return request("POST", "/v1/files", { form });
}

// Streams /v1/chat/completions (stream: true): calls onDelta(text) for each
// content delta as it arrives, and resolves to {text, finish_reason, usage}.
// SSE framing: events are separated by a blank line; each "data: " line is one
// JSON chunk, and "data: [DONE]" ends the stream.
export async function streamChat(body, { onDelta, signal } = {}) {
  const resp = await request("POST", "/v1/chat/completions", {
    json: { ...body, stream: true, stream_options: { include_usage: true } }, signal, raw: true,
  });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder("utf-8");  // stream: true keeps a split multi-byte character whole
  let buffer = "", text = "", finish = null, usage = null;
  const handle = (event) => {
    const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
    if (!data) return false;
    if (data === "[DONE]") return true;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(chunk.error.message, { code: chunk.error.code, status: 500 });
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.index !== 0) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) { text += piece; onDelta && onDelta(piece, text); }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    buffer = buffer.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (handle(event)) { reader.cancel().catch(() => {}); return { text, finish_reason: finish, usage }; }
    }
    if (done) break;
  }
  if (buffer.trim()) handle(buffer);
  return { text, finish_reason: finish, usage };
}

// Downloads a response body (e.g. a model export zip) as a file. A plain link
// cannot carry the Authorization header, so fetch it and hand the browser a blob.
export async function download(path, fallbackName) {
  const resp = await request("GET", path, { raw: true });
  const cd = resp.headers.get("Content-Disposition") || "";
  const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd);
  const name = m ? decodeURIComponent(m[1]) : fallbackName;
  const blob = await resp.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return { name, bytes: blob.size };
}

// All pages of a list endpoint that pages with after= and has_more.
export async function listAll(path, params = {}, max = 5000) {
  const out = [];
  let after;
  for (;;) {
    const page = await get(path + qs({ ...params, after }));
    out.push(...page.data);
    if (!page.has_more || !page.data.length || out.length >= max) return out;
    after = page.data[page.data.length - 1].id;
  }
}
