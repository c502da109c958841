// The REST API. Errors arrive as application/problem+json
// {status, code, message, field}; they are thrown as ApiError so callers can
// show a validation message next to the field it names.

import { noteServerDate } from './clock.js';

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

/** How long one request may take before it is reported as failed. */
const REQUEST_TIMEOUT_MS = 15000;

/** Called on 401: the server wants a token (see auth.js). */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export async function request(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: { Accept: 'application/json', ...headers }, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === 'TimeoutError') throw new ApiError(0, 'timeout', 'the server did not answer in time');
    throw new ApiError(0, 'network', 'the server cannot be reached');
  }
  noteServerDate(res.headers.get('date'));
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    if (res.status === 401) onUnauthorized();
    const p = data && typeof data === 'object' ? data : {};
    throw new ApiError(res.status, p.code || `http_${res.status}`, p.message || `${method} ${path}: HTTP ${res.status}`, p.field);
  }
  return data;
}

/**
 * Whether the server could serve a stream over plain HTTP now: its health
 * answer (200, or a 503 for a part that streams do not need, such as the
 * Kafka ingest) says the database and the change listener are up and it is
 * not stopping. An answer without that shape (a proxy's 502) is no.
 */
export async function streamsServed() {
  try {
    const res = await fetch('/api/health', { headers: { Accept: 'application/json' }, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
    noteServerDate(res.headers.get('date'));
    const h = await res.json();
    return h?.database?.ok === true && h?.listener?.ok === true && h?.status !== 'shutting_down';
  } catch {
    return false;
  }
}

/** Query string from an object; arrays are joined with commas, empty values dropped. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v == null || v === '' || (Array.isArray(v) && v.length === 0)) continue;
    q.set(k, Array.isArray(v) ? v.join(',') : String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

export const api = {
  listOrders: (params) => request('GET', `/api/orders${query(params)}`),
  getOrder: (id) => request('GET', `/api/orders/${id}`),
  history: (id) => request('GET', `/api/orders/${id}/history`),
  recentChanges: (params) => request('GET', `/api/changes${query(params)}`),
  createOrder: (order) => request('POST', '/api/orders', { body: order }),
  patchOrder: (id, patch, version) =>
    request('PATCH', `/api/orders/${id}`, { body: patch, headers: version ? { 'If-Match': `"${version}"` } : {} }),
  cancelOrder: (id, version) =>
    request('POST', `/api/orders/${id}/cancel`, { headers: version ? { 'If-Match': `"${version}"` } : {} }),
  deleteOrder: (id, version) =>
    request('DELETE', `/api/orders/${id}`, { headers: version ? { 'If-Match': `"${version}"` } : {} }),
  transitions: () => request('GET', '/api/transitions'),
  stats: () => request('GET', '/api/stats'),
  deadLetters: (limit) => request('GET', `/api/dlq${query({ limit })}`),
};
