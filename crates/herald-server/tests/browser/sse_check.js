// Drives headless Chromium (Debian's, through playwright-core: no browser download) on
// sse_page.html for tests/sse_browser.rs, and prints one JSON line with what happened.
//
//   node sse_check.js CHROMIUM HERALD_URL PAGE_URL CHANNEL
//
// 1. Opens the page (an EventSource on HERALD_URL/sse?channel=CHANNEL, another origin) and
//    waits until the stream is open.
// 2. Publishes BATCH publications ({"n": i}) through herald's HTTP API and waits until the
//    page has them.
// 3. CYCLES times: asks herald to end every stream (POST /api/disconnect {"all": true}),
//    waits until the page's EventSource saw the end (error event), publishes BATCH more while
//    it waits to reconnect (retry: 1000), checks that it was still disconnected afterwards,
//    waits for the reconnection and the missed publications, then publishes BATCH live ones.
// 4. Prints {"ok": true, "total": N, "state": <the page's state>, "cycles": [...]}; the Rust
//    test checks the state. On a failure it prints {"ok": false, "error": ..., "state": ...}
//    and exits with 1.
"use strict";

const { chromium } = require("playwright-core");

const BATCH = 10;
const CYCLES = 2;
const WAIT_MS = 20000;

async function main() {
  const [executablePath, herald, pageUrl, channel] = process.argv.slice(2);
  if (!channel) {
    throw new Error("usage: node sse_check.js CHROMIUM HERALD_URL PAGE_URL CHANNEL");
  }
  const logs = [];
  let browser;
  let page;
  const out = { ok: false, total: 0, cycles: [], logs };
  const state = () => page.evaluate(() => JSON.parse(JSON.stringify(window.heraldState)));

  async function waitFor(what, predicate) {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const s = await state();
      if (predicate(s)) return s;
      if (Date.now() > deadline) {
        const e = new Error(`timed out waiting for ${what}`);
        e.state = s;
        throw e;
      }
      await new Promise(r => setTimeout(r, 25));
    }
  }

  async function api(path, body) {
    const r = await fetch(herald + path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await r.text();
    if (r.status !== 200) throw new Error(`${path}: ${r.status} ${text}`);
    return JSON.parse(text);
  }

  let next = 0;
  async function publish(count) {
    for (let i = 0; i < count; i++) {
      const r = await api("/api/publish", { channel, data: { n: next } });
      if (r.offset !== next + 1) throw new Error(`publication ${next} got ${JSON.stringify(r)}`);
      next += 1;
    }
  }

  try {
    browser = await chromium.launch({
      executablePath,
      headless: true,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    page = await browser.newPage();
    page.on("console", m => logs.push(`console.${m.type()}: ${m.text()}`));
    page.on("pageerror", e => logs.push(`pageerror: ${e}`));
    page.on("requestfailed", r => logs.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
    await page.goto(pageUrl);

    await waitFor("the stream to open", s => s.opens >= 1 && s.readyState === 1);
    await publish(BATCH);
    await waitFor(`${next} publications`, s => s.received.length >= next);

    for (let cycle = 0; cycle < CYCLES; cycle++) {
      const before = await state();
      const dropped = await api("/api/disconnect", { all: true });
      await waitFor("the browser to see the stream end", s => s.errors > before.errors);
      const from = next;
      await publish(BATCH);
      const after = await state();
      out.cycles.push({
        dropped: dropped.disconnected,
        published: [from, next],
        // Published while the EventSource waited to reconnect: they can only arrive by resume.
        publishedWhileDisconnected: after.opens === before.opens && after.readyState !== 1,
      });
      await waitFor("the reconnection and the missed publications",
        s => s.opens > before.opens && s.received.length >= next);
      await publish(BATCH);
      await waitFor(`${next} publications`, s => s.received.length >= next);
    }
    // Anything extra (a duplicate) would have arrived by now, after a short grace.
    await new Promise(r => setTimeout(r, 200));
    out.state = await state();
    out.total = next;
    out.ok = true;
  } catch (e) {
    out.error = String(e && e.stack || e);
    out.state = e.state || (page ? await state().catch(() => null) : null);
    out.total = next;
  } finally {
    if (browser) await browser.close().catch(() => {});
  }
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exitCode = out.ok ? 0 : 1;
}

main().catch(e => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.stack || e) }) + "\n");
  process.exitCode = 1;
});
