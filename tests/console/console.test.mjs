// Drives the gateway's web console in headless Chromium (Debian's /usr/bin/chromium, never a
// downloaded browser). Started by tests/api/console.rs with a running gateway and Refiner
// simulator; exits non-zero, naming the failed step, on any failure or browser console error.
//
// Environment: GATEWAY_URL, SIM_URL, ADMIN_TOKEN, WRITE_KEY; CHROMIUM_BIN (default
// /usr/bin/chromium); SCREENSHOT_DIR (set: a PNG of each page is written there).
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const GATEWAY = env('GATEWAY_URL');
const SIM = env('SIM_URL');
const TOKEN = env('ADMIN_TOKEN');
const WRITE_KEY = env('WRITE_KEY');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const SHOTS = process.env.SCREENSHOT_DIR || '';

const errors = [];
const timings = {};
let current = 'start';

function step(name) {
  current = name;
  console.log(`step: ${name}`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function shot(page, name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: false });
}

async function send(kind, event) {
  const response = await fetch(`${GATEWAY}/v1/${kind}`, {
    method: 'POST',
    headers: {
      Authorization: `Basic ${Buffer.from(`${WRITE_KEY}:`).toString('base64')}`,
      'Content-Type': 'application/json',
    },
    body: JSON.stringify(event),
  });
  check(response.status === 200, `POST /v1/${kind} answered ${response.status}`);
}

async function setFaults(faults) {
  const response = await fetch(`${SIM}/_sim/faults`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(faults),
  });
  check(response.ok, `POST /_sim/faults answered ${response.status}`);
}

async function simCalls(user) {
  const response = await fetch(`${SIM}/_sim/calls?user=${encodeURIComponent(user)}`);
  return (await response.json()).calls;
}

async function until(what, timeoutMs, probe) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function signIn(page) {
  step('sign in');
  await page.goto(`${GATEWAY}/console`);
  await page.waitForSelector('#sign-in-form');
  await shot(page, 'sign-in');
  await page.fill('#token', TOKEN);
  await page.click('#sign-in-form button[type=submit]');
  await page.waitForSelector('#top:not([hidden])');
  step('overview');
  await page.waitForSelector('#overview .card[data-source="default"] svg');
}

async function liveView(page) {
  step('live view: a sent event appears with its Refiner call and outcome within 1 s');
  await page.click('nav a[data-page="live"]');
  await page.waitForFunction(() => document.getElementById('live-state')?.textContent.startsWith('connected'));
  const messageId = `console-${randomUUID()}`;
  const entry = `li.entry[data-message-id="${messageId}"]`;
  const sent = Date.now();
  await send('track', { messageId, userId: 'u-console', event: 'Console Test', properties: { plan: 'pro' } });
  await page.waitForSelector(entry, { timeout: 1000 });
  timings.live_event_ms = Date.now() - sent;
  await page.waitForSelector(`${entry}[data-outcome="delivered"] .calls .call`, { state: 'attached', timeout: Math.max(1, 1000 - (Date.now() - sent)) });
  timings.live_outcome_ms = Date.now() - sent;
  await page.click(`${entry} summary`);
  const calls = await page.$$eval(`${entry} .calls .call`, (els) => els.map((e) => e.textContent));
  check(calls.some((c) => /^POST \/(v1\/)?track-event$/.test(c)), `the entry's Refiner calls read ${JSON.stringify(calls)}`);
  const outcome = await page.textContent(`${entry} .outcome`);
  check(/^delivered 2\d\d in \d+ ms/.test(outcome), `the outcome reads ${JSON.stringify(outcome)}`);
  const payload = await page.textContent(`${entry} .payload pre`);
  check(payload.includes('Console Test'), 'the entry shows the Segment payload');
  check((await page.textContent('#live-sampled')).startsWith('sampled: '), 'the sampled notice is shown');
  await shot(page, 'live');
  return messageId;
}

async function findEvent(page, messageId) {
  step('find the event by messageId');
  await page.click('nav a[data-page="find"]');
  await page.selectOption('#find-source', 'default');
  await page.selectOption('#find-by', 'message_id');
  await page.fill('#find-value', messageId);
  await page.click('#page form button[type=submit]');
  const card = `.found[data-message-id="${messageId}"]`;
  await page.waitForSelector(card, { timeout: 5000 });
  const state = await page.textContent(`${card} .state`);
  check(state.startsWith('delivered'), `the found event's state reads ${JSON.stringify(state)}`);
  const attempts = await page.$$(`${card} table.attempts tbody tr`);
  check(attempts.length >= 1, 'the found event lists its attempts');
  await shot(page, 'find');
}

async function deadLetter(page) {
  step('dead letter: Refiner refuses a user\'s calls (400)');
  await setFaults({ count_400: 1000 });
  const messageId = `dead-${randomUUID()}`;
  const user = `u-dead-${randomUUID().slice(0, 8)}`;
  await send('track', { messageId, userId: user, event: 'Refused Event' });
  await page.click('nav a[data-page="dead-letters"]');
  await page.selectOption('#dl-source', 'default');
  const row = `#dl-table tr:has(td:text-is("${messageId}"))`;
  await until('the dead letter to be listed', 20000, async () => {
    await page.click('#page form button[type=submit]');
    await page.waitForTimeout(300);
    return (await page.$(row)) !== null;
  });
  step('dead letter: inspect');
  await page.click(`${row} button.inspect`);
  await page.waitForSelector('#dl-inspected');
  const history = await page.textContent('#dl-inspected table');
  check(history.includes('400'), 'the inspected dead letter shows the 400 answer');
  await shot(page, 'dead-letters');
  step('dead letter: replay after the fault is cleared, until the simulator receives it');
  await setFaults({});
  await page.click('#dl-inspected button.retry');
  await until('the simulator to accept the replayed event', 20000, async () => {
    const calls = await simCalls(user);
    return calls.some((c) => c.status === 200);
  });
  await until('the dead letter to leave the list', 5000, async () => {
    await page.click('#page form button[type=submit]');
    await page.waitForTimeout(200);
    return (await page.$(row)) === null;
  });
}

async function playground(page) {
  step('mapping playground shows the calls');
  await page.click('nav a[data-page="playground"]');
  await page.selectOption('#pg-source', 'default');
  await page.click('#page form button[type=submit]');
  await page.waitForSelector('#pg-results .preview .call', { timeout: 5000 });
  const calls = await page.$$eval('#pg-results .preview .call', (els) => els.map((e) => e.textContent));
  check(calls.some((c) => /^POST \/(v1\/)?track-event$/.test(c)), `the playground's calls read ${JSON.stringify(calls)}`);
  await shot(page, 'playground');
}

async function signOut(page, context) {
  step('overview after the traffic');
  await page.click('nav a[data-page="overview"]');
  await page.waitForSelector('#overview .card[data-source="default"] svg');
  await shot(page, 'overview');
  step('sign out; the old session is refused by /api and /console');
  const cookies = await context.cookies(GATEWAY);
  const session = cookies.find((c) => c.name === 'refiner_gateway_session');
  check(session && session.httpOnly && session.sameSite === 'Strict', 'the session cookie is HttpOnly and SameSite=Strict');
  await page.click('#sign-out');
  await page.waitForSelector('#sign-in-page:not([hidden])');
  for (const path of ['/api/overview', '/api/events/default/dead-letters', '/console/overview']) {
    const response = await fetch(`${GATEWAY}${path}`, { headers: { Cookie: `refiner_gateway_session=${session.value}` } });
    check(response.status === 401, `${path} with the signed-out session answered ${response.status}`);
  }
}

async function main() {
  const profile = mkdtempSync(join(tmpdir(), 'console-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 860 },
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (message) => {
      const text = message.text();
      if (message.type() === 'error' || /Content Security Policy/i.test(text)) {
        errors.push(`console ${message.type()} during "${current}": ${text}`);
      }
    });
    page.on('pageerror', (error) => errors.push(`page error during "${current}": ${error.message}`));
    await signIn(page);
    const messageId = await liveView(page);
    await findEvent(page, messageId);
    await deadLetter(page);
    await playground(page);
    await signOut(page, context);
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
  check(errors.length === 0, `the browser reported errors:\n${errors.join('\n')}`);
  console.log(`ok ${JSON.stringify(timings)}`);
}

main().catch((error) => {
  console.error(`FAILED at "${current}": ${error.message}`);
  if (errors.length) console.error(`browser errors:\n${errors.join('\n')}`);
  process.exit(1);
});
