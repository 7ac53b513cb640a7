// The native API, with the API key (if any) sent on every call. EventSource cannot send
// headers, so Server-Sent Events are read from a fetch() stream instead.

const KEY_STORAGE = "sdserve.apiKey";

export class ApiError extends Error {
  constructor(status, message, body = {}, retryAfter = null) {
    super(message);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

export const auth = {
  get key() { return localStorage.getItem(KEY_STORAGE) || ""; },
  set key(value) { value ? localStorage.setItem(KEY_STORAGE, value) : localStorage.removeItem(KEY_STORAGE); },
  headers() { return this.key ? { Authorization: `Bearer ${this.key}` } : {}; },
};

export async function request(method, path, body) {
  const init = { method, headers: { ...auth.headers() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "Cannot reach the server. Is it running?");
  }
  if (response.ok) return response.status === 204 ? null : response.json();
  let data = {};
  try { data = await response.json(); } catch { /* not JSON */ }
  const retry = response.headers.get("Retry-After");
  throw new ApiError(response.status, data.detail || response.statusText, data, retry ? Number(retry) : null);
}

export const api = {
  ready: () => fetch("/readyz").then(async (r) => ({ ok: r.ok, ...(await r.json().catch(() => ({}))) })),
  models: () => request("GET", "/api/v1/models"),
  samplers: () => request("GET", "/api/v1/samplers"),
  limits: () => request("GET", "/api/v1/limits"),
  loras: () => request("GET", "/api/v1/loras"),
  controlnets: () => request("GET", "/api/v1/controlnets"),
  jobs: (limit = 40, offset = 0) => request("GET", `/api/v1/jobs?limit=${limit}&offset=${offset}`),
  job: (id) => request("GET", `/api/v1/jobs/${id}`),
  submit: (body) => request("POST", "/api/v1/jobs", body),
  cancel: (id) => request("DELETE", `/api/v1/jobs/${id}`),
};

// Images need the key too, so they are fetched and shown through object URLs.
const blobCache = new Map();
export async function imageBlob(url) {
  if (!blobCache.has(url)) {
    blobCache.set(url, fetch(url, { headers: auth.headers() }).then((r) => {
      if (!r.ok) throw new ApiError(r.status, `image ${r.status}`);
      return r.blob();
    }));
  }
  try {
    return await blobCache.get(url);
  } catch (err) {
    blobCache.delete(url);
    throw err;
  }
}

export async function imageObjectUrl(url) {
  return URL.createObjectURL(await imageBlob(url));
}

// Read a job's Server-Sent Events until it ends; onEvent(name, data) for each.
export async function followJob(id, onEvent, signal) {
  const response = await fetch(`/api/v1/jobs/${id}/events`, { headers: auth.headers(), signal });
  if (!response.ok) throw new ApiError(response.status, `events ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0 || (cut = buffer.indexOf("\r\n\r\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + (buffer[cut] === "\r" ? 4 : 2));
      let name = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (!data.length) continue; // comments and pings
      const payload = JSON.parse(data.join("\n"));
      onEvent(name, payload); // the server ends the stream after a job's last event (jobs/events.py END_EVENTS)
    }
  }
}
