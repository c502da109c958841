// What the browser tests and the screenshot script share: an ordercast
// process of their own (with its private PostgreSQL in a fresh temp dir),
// psql against that database, a headless Chromium, and bounded waiting.

import { execFile, spawn, spawnSync } from 'node:child_process';
import { createWriteStream, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, chmodSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** Rejects after `ms` with a message naming what was awaited. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** psql with ON_ERROR_STOP; resolves with the unaligned, tuples-only output. */
export function psql(url, sql, { timeoutMs = 60000 } = {}) {
  return new Promise((resolve, reject) => {
    execFile('psql', [url, '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-c', sql],
      { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`psql failed: ${stderr.trim() || err.message}\n  SQL: ${sql.slice(0, 300)}`));
        else resolve(stdout.trim());
      });
  });
}

/**
 * RUST_LOG for ordercast: the caller's, with ordercast's own info lines kept
 * (the harness reads its PostgreSQL URL and that it listens from them).
 * Left alone when it names ordercast or lets info through by default.
 */
export function withOwnInfo(given = 'info,actix_web::middleware::logger=warn') {
  const slash = given.indexOf('/');
  const [spec, pattern] = slash < 0 ? [given, ''] : [given.slice(0, slash), given.slice(slash)];
  const directives = spec.split(',').map((d) => d.trim()).filter(Boolean);
  const named = directives.some((d) => /^ordercast($|=|::)/.test(d));
  const level = directives.filter((d) => !d.includes('=')).pop()?.toLowerCase();
  if (named || ['info', 'debug', 'trace'].includes(level)) return given;
  return [...directives, 'ordercast=info'].join(',') + pattern;
}

/**
 * One ordercast process: `$ORDERCAST_BIN --bind 127.0.0.1:PORT --data-dir DIR`.
 * Without DATABASE_URL it runs its own PostgreSQL in DIR. `restart()` starts
 * a new process on the same port and data dir (after `kill()`).
 */
export class Ordercast {
  /** @param env extra environment variables (e.g. ORDERCAST_API_KEYS) */
  constructor(bin, env = {}) {
    this.bin = bin;
    this.env = env;
    this.root = mkdtempSync(join(tmpdir(), 'ordercast-browser-'));
    // The embedded PostgreSQL runs as the postgres user when we are root.
    chmodSync(this.root, 0o755);
    this.dataDir = join(this.root, 'data');
    this.logPath = join(this.root, 'ordercast.log');
    this.log = createWriteStream(this.logPath, { flags: 'a' });
    this.lines = [];
    this.proc = null;
  }

  async start(port) {
    this.port = port ?? this.port ?? (await freePort());
    this.url = `http://127.0.0.1:${this.port}`;
    const env = { ...process.env, RUST_LOG: withOwnInfo(process.env.RUST_LOG), ...this.env };
    delete env.DATABASE_URL;
    const proc = spawn(this.bin, ['--bind', `127.0.0.1:${this.port}`, '--data-dir', this.dataDir],
      { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
    this.exited = exited;
    const ready = new Promise((resolve, reject) => {
      let buf = '';
      const onData = (chunk) => {
        this.log.write(chunk);
        buf += chunk.toString();
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          this.lines.push(line);
          if (this.lines.length > 400) this.lines.shift();
          // The URL is logged without the password, which its file holds.
          const pg = line.match(/embedded PostgreSQL is up: PGPASSFILE=(\S+) psql postgres:\/\/postgres@(\S+)/);
          if (pg) {
            const password = readFileSync(pg[1], 'utf8').split('\n')[0].split(':').pop();
            this.pgUrl = `postgres://postgres:${password}@${pg[2]}`;
          }
          if (/ordercast listening on/.test(line)) resolve();
        }
      };
      proc.stdout.on('data', onData);
      proc.stderr.on('data', onData);
      exited.then(({ code, signal }) => reject(new Error(`ordercast exited early (code ${code}, signal ${signal})\n${this.tail()}`)));
    });
    await within(90000, 'ordercast to start', ready).catch((e) => {
      // (An early exit's message has the last lines already.)
      throw this.proc.exitCode === null && this.proc.signalCode === null ? new Error(`${e.message}\n${this.tail()}`) : e;
    });
    if (!this.pgUrl) throw new Error(`ordercast did not log its PostgreSQL URL\n${this.tail()}`);
  }

  tail(n = 40) {
    return this.lines.slice(-n).map((l) => `    | ${l}`).join('\n');
  }

  sql(query, opts) {
    return psql(this.pgUrl, query, opts);
  }

  /** SIGKILL: no goodbye to clients, the private PostgreSQL keeps running. */
  async kill() {
    if (!this.proc || this.proc.exitCode != null || this.proc.signalCode != null) return;
    this.proc.kill('SIGKILL');
    await within(10000, 'ordercast to die', this.exited);
  }

  /** SIGTERM (ordercast then stops its PostgreSQL), SIGKILL if that takes too long. */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode != null || proc.signalCode != null) return;
    proc.kill('SIGTERM');
    try {
      await within(15000, 'ordercast to stop', this.exited);
    } catch {
      proc.kill('SIGKILL');
      await within(5000, 'ordercast to die', this.exited).catch(() => {});
    }
  }

  /** Stops everything, whatever state it is in, and removes the temp dir. */
  async cleanup({ keep = false } = {}) {
    await this.stop().catch(() => {});
    stopOrphanedPostgres(join(this.dataDir, 'pg'));
    this.log.end();
    if (!keep) rmSync(this.root, { recursive: true, force: true });
  }
}

/** A PostgreSQL left behind by a SIGKILLed ordercast is stopped with pg_ctl. */
function stopOrphanedPostgres(pgData) {
  if (!existsSync(join(pgData, 'postmaster.pid'))) return;
  const versions = existsSync('/usr/lib/postgresql') ? readdirSync('/usr/lib/postgresql').sort((a, b) => a - b) : [];
  const pgCtl = versions.length ? `/usr/lib/postgresql/${versions[versions.length - 1]}/bin/pg_ctl` : 'pg_ctl';
  const args = ['-D', pgData, '-m', 'immediate', '-w', '-t', '20', 'stop'];
  const asRoot = process.getuid && process.getuid() === 0;
  spawnSync(asRoot ? 'runuser' : pgCtl, asRoot ? ['-u', 'postgres', '--', pgCtl, ...args] : args,
    { stdio: 'ignore', timeout: 30000 });
}

export function launchChromium() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--no-first-run', '--disable-dev-shm-usage',
      // A document answered by a Playwright route (the CSP test) has no
      // address space, so Chromium would treat its same-origin WebSocket to
      // 127.0.0.1 as a public page reaching into the local network.
      '--disable-features=LocalNetworkAccessChecks'],
    timeout: 60000,
  });
}

/**
 * Realistic orders for screenshots and tests: varied customers, products and
 * prices, created over the last `minutes` minutes, then moved along the
 * status machine like real orders (so the history is real history).
 */
export async function seedOrders(db, n, { minutes = 45, actor = null } = {}) {
  const setActor = actor ? `SELECT set_config('ordercast.actor', '${actor}', false);` : '';
  await db(`${setActor}
    WITH names AS (
      SELECT ARRAY['Ada Lovelace','Grace Hopper','Alan Turing','Edsger Dijkstra','Barbara Liskov','Donald Knuth',
        'Frances Allen','Ken Thompson','Margaret Hamilton','Dennis Ritchie','Radia Perlman','Leslie Lamport',
        'Hedy Lamarr','John Backus','Katherine Johnson','Tim Berners-Lee','Sophie Wilson','Linus Torvalds',
        'Mary Kenneth Keller','Niklaus Wirth','Shafi Goldwasser','Whitfield Diffie','Adele Goldberg','Butler Lampson'] AS n,
      ARRAY['Mechanical keyboard','USB-C dock','27" monitor','Noise-cancelling headphones','Ergonomic mouse',
        'Laptop stand','Webcam 4K','Desk lamp','Standing desk','Office chair','Cable kit','Portable SSD 1 TB'] AS p,
      ARRAY[129,189,329,249,59,45,139,39,549,399,19,99]::numeric[] AS price
    )
    INSERT INTO orders (customer_name, customer_email, product, quantity, unit_price, created_at)
    SELECT c, lower(replace(c, ' ', '.')) || '@example.com', p, q, round((base * (0.85 + random() * 0.3))::numeric, 2), at
    FROM (
      SELECT names.n[1 + floor(random() * array_length(names.n, 1))::int] AS c,
             names.p[pi] AS p, names.price[pi] AS base,
             CASE WHEN random() < 0.7 THEN 1 ELSE 1 + floor(random() * 4)::int END AS q,
             now() - (${minutes} * 60 * (1 - g::float / ${n}) + random() * 20) * interval '1 second' AS at
      FROM names, generate_series(1, ${n}) g,
           LATERAL (SELECT 1 + floor(random() * array_length(names.p, 1))::int + 0 * g AS pi) pick
    ) rows
    ORDER BY at`);
  // Move most orders along, oldest furthest, as a day of work would.
  const step = (from, to, share) => db(`${setActor}
    UPDATE orders SET status = '${to}' WHERE id IN (
      SELECT id FROM orders WHERE status = '${from}' AND random() < ${share})`);
  await step('pending', 'processing', 0.8);
  await step('pending', 'cancelled', 0.15);
  await step('processing', 'processed', 0.85);
  await step('processing', 'failed', 0.2);
  await db(`UPDATE orders SET error_message = 'payment declined by the card issuer' WHERE status = 'failed' AND error_message IS NULL`);
  await step('processed', 'shipped', 0.85);
  await step('shipped', 'delivered', 0.7);
}
