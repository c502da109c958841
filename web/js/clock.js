// The server's clock, as the page knows it. Orders' times are the server's
// (its database's); "orders in the last 60 s" and the chart's minutes are
// counted on that clock, whatever the browser's says: a computer whose clock
// is minutes off would otherwise count this minute's orders as future ones.
// Every API answer's Date header is a sample (whole seconds: the server's
// clock was in [Date, Date + 1 s) when it answered); the offset is the
// median of the last few, and ignored below a second, the samples' own error.

const SAMPLES = 15;
const samples = [];
let offset = 0;

/** An API answer's `Date` header, received at `receivedAt` (the browser's clock). */
export function noteServerDate(header, receivedAt = Date.now()) {
  const t = Date.parse(header ?? '');
  if (Number.isNaN(t)) return;
  samples.push(t + 500 - receivedAt);
  if (samples.length > SAMPLES) samples.shift();
  const sorted = [...samples].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  offset = Math.abs(median) < 1000 ? 0 : median;
}

/** Milliseconds since the epoch on the server's clock. */
export const serverNow = () => Date.now() + offset;
