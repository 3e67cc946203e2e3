// The officer's console in a real browser: Debian's headless chromium driven by playwright-core.
// scripts/console-test.sh starts a throwaway broker and runs this with, in the environment:
//   KB_CONSOLE_URL        the broker's base URL (https://127.0.0.1:PORT)
//   KB_CONSOLE_CERT_FILE  the broker's server certificate (PEM): chromium trusts exactly its key
//   KB_ADMIN_ID, KB_ADMIN_SECRET   the bootstrap admin's credentials
//   KB_CONSOLE_OUT        where the screenshots go
// and NODE_EXTRA_CA_CERTS set to the dev CA, for the few JSON API calls the set-up makes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run ./scripts/console-test.sh`);
  return value;
};
const BASE = env('KB_CONSOLE_URL');
const ADMIN_ID = env('KB_ADMIN_ID');
const ADMIN_SECRET = env('KB_ADMIN_SECRET');
const OUT = env('KB_CONSOLE_OUT');
mkdirSync(OUT, { recursive: true });
// Generous for a loaded two-core machine; every wait polls for a condition, none sleeps.
const PATIENCE = 60_000;

// Chromium trusts the broker's certificate by its public key's SHA-256, and nothing else.
const spki = createHash('sha256')
  .update(new X509Certificate(readFileSync(env('KB_CONSOLE_CERT_FILE'))).publicKey.export({ type: 'spki', format: 'der' }))
  .digest('base64');

let browser;
let context;
let page;
const cspViolations = [];
const state = {};

async function shot(name, fullPage = true) {
  await page.screenshot({ path: join(OUT, `console-${name}.png`), fullPage });
}

async function open(linkText) {
  await page.getByRole('navigation').getByRole('link', { name: linkText, exact: true }).click();
  await page.getByRole('heading', { level: 1, name: linkText }).waitFor({ timeout: PATIENCE });
}

/** The JSON API, as the bootstrap admin: set-up the console is not under test for. */
async function api(method, path, body) {
  if (!state.token) {
    const response = await fetch(`${BASE}/v1/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ grant_type: 'client_credentials', client_id: ADMIN_ID, client_secret: ADMIN_SECRET }),
    });
    assert.equal(response.status, 200, 'a token for the set-up');
    state.token = (await response.json()).access_token;
  }
  const response = await fetch(`${BASE}${path}`, {
    method,
    headers: { authorization: `Bearer ${state.token}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

before(async () => {
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      `--ignore-certificate-errors-spki-list=${spki}`,
    ],
  });
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(PATIENCE);
  // A blocked inline script or style would show here: the pages must not need any.
  page.on('console', (message) => {
    if (/Content Security Policy|Refused to (apply|execute|load)/i.test(message.text())) {
      cspViolations.push(message.text());
    }
  });
});

after(async () => {
  await browser?.close();
});

test('sign in with the admin client', async () => {
  await page.goto(`${BASE}/console/`);
  await page.waitForURL(`${BASE}/console/sign-in`);
  await shot('sign-in');
  await page.getByLabel('Client id').fill(ADMIN_ID);
  await page.getByLabel('Client secret').fill(ADMIN_SECRET);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.waitForURL(`${BASE}/console/`);
  await page.getByRole('heading', { level: 1, name: 'Overview' }).waitFor();
  for (const text of ['Overview', 'Clients', 'Keys', 'Master keys', 'Audit', 'Settings', 'Usage']) {
    assert.ok(await page.getByRole('navigation').getByRole('link', { name: text, exact: true }).isVisible(), text);
  }
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === 'kb_console');
  assert.ok(session, 'the session cookie');
  assert.equal(session.httpOnly, true);
  assert.equal(session.secure, true);
  assert.equal(session.sameSite, 'Strict');
  assert.equal(session.path, '/console');
  state.cookie = session;
  // The overview shows the token's objects, the master keys and readiness.
  assert.match(await page.locator('#token-objects').innerText(), /keybroker-mk-v1/);
  assert.match(await page.locator('#master-keys').innerText(), /active/);
  await shot('overview');
});

test('register a client and see its secret once', async () => {
  await open('Clients');
  state.clientName = `playwright-${Date.now()}`;
  const form = page.locator('form#register');
  await form.getByLabel('Name').fill(state.clientName);
  await form.getByLabel('datakey').check();
  await form.getByLabel('wrap', { exact: true }).check();
  await form.getByRole('button', { name: 'Register' }).click();
  const secret = (await page.locator('#new-client-secret').innerText()).trim();
  state.clientId = (await page.locator('#new-client-id').innerText()).trim();
  assert.ok(secret.length >= 32, `a secret: ${secret.length} characters`);
  await shot('clients-registered');
  // Shown once: the next look at the page does not have it.
  await open('Clients');
  assert.equal(await page.locator('#new-client-secret').count(), 0);
  assert.ok(!(await page.content()).includes(secret), 'the secret is not shown again');
  const row = page.locator(`tr[data-client-id="${state.clientId}"]`);
  assert.match(await row.innerText(), new RegExp(state.clientName));
  assert.equal((await row.locator('.client-state').innerText()).trim(), 'active');
  await shot('clients');
});

test('disable the client and see its state change', async () => {
  const row = page.locator(`tr[data-client-id="${state.clientId}"]`);
  await row.getByRole('button', { name: 'Disable' }).click();
  await page.getByRole('status').filter({ hasText: 'disabled' }).waitFor();
  const after = page.locator(`tr[data-client-id="${state.clientId}"]`);
  assert.equal((await after.locator('.client-state').innerText()).trim(), 'disabled');
  assert.equal(await after.getByRole('button', { name: 'Enable' }).count(), 1);
  const { body } = await api('GET', `/v1/admin/clients/${state.clientId}`);
  assert.equal(body.state, 'disabled', 'the API sees the same state');
});

test('a form without its CSRF token is refused and changes nothing', async () => {
  const row = page.locator(`tr[data-client-id="${state.clientId}"]`);
  const form = row.locator(`form[action="/console/clients/${state.clientId}/enable"]`);
  // Take the hidden field out, as a forged cross-site form would lack it.
  await form.locator('input[name="csrf_token"]').evaluate((input) => input.remove());
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/enable')),
    form.getByRole('button', { name: 'Enable' }).click(),
  ]);
  assert.equal(response.status(), 403);
  await page.getByRole('alert').filter({ hasText: 'csrf_refused' }).waitFor();
  await shot('csrf-refused');
  const { body } = await api('GET', `/v1/admin/clients/${state.clientId}`);
  assert.equal(body.state, 'disabled', 'still disabled: nothing changed');
});

test('rotate a master key and watch a rewrap finish', async () => {
  // Something to move: managed keys sealed under the current version.
  for (let i = 0; i < 40; i += 1) {
    const { status } = await api('POST', '/v1/keys', { name: `pw-${Date.now()}-${i}`, format: 'raw', length: 32 });
    assert.equal(status, 201);
  }
  await page.goto(`${BASE}/console/`);
  await open('Master keys');
  const versions = await page.locator('#master-keys tr').count();
  await page.getByRole('button', { name: 'Rotate master key' }).click();
  await page.getByRole('status').filter({ hasText: 'Rotated' }).waitFor();
  assert.equal(await page.locator('#master-keys tr').count(), versions + 1, 'one more version');
  await page.getByRole('button', { name: 'Start rewrap' }).click();
  await page.getByRole('status').filter({ hasText: 'Rewrap job' }).waitFor();
  // While the job runs, htmx polls the progress fragment and swaps it in; it ends with done.
  await page.locator('#rewrap-state').filter({ hasText: 'done' }).waitFor({ timeout: PATIENCE });
  assert.match(await page.locator('#rewrap').innerText(), / 0 remaining/);
  await shot('master-keys');
  const { body } = await api('GET', '/v1/admin/master-keys');
  assert.equal(body.rewrap.state, 'done');
  const old = body.master_keys.filter((mk) => mk.state !== 'active');
  assert.ok(old.every((mk) => mk.stored_blobs === 0), 'nothing left under the old versions');
});

test('verify the audit chain', async () => {
  await open('Audit');
  assert.ok(await page.locator('#audit-events tr').count() > 1, 'events listed');
  await page.getByRole('button', { name: 'Verify chain' }).click();
  await page.locator('#chain-verdict').filter({ hasText: 'intact' }).waitFor();
  // The verdict and the first events: the whole trail would make a very long picture.
  await shot('audit', false);
});

test('the other pages open', async () => {
  await open('Keys');
  assert.ok(await page.locator('#keys tr').count() > 40, 'the managed keys');
  await shot('keys');
  await open('Settings');
  await page.getByRole('button', { name: 'Save settings' }).click();
  await page.getByRole('status').filter({ hasText: 'Saved' }).waitFor();
  await shot('settings');
  await open('Usage');
  assert.equal(await page.locator('svg#usage-chart').count(), 1);
  await shot('usage');
});

test('sign out and see the session gone', async () => {
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.waitForURL(`${BASE}/console/sign-in`);
  await page.goto(`${BASE}/console/clients`);
  await page.waitForURL(`${BASE}/console/sign-in`);
  // The old cookie, put back, is worth nothing: the session ended on the server.
  await context.addCookies([state.cookie]);
  await page.goto(`${BASE}/console/`);
  await page.waitForURL(`${BASE}/console/sign-in`);
  assert.equal(await page.getByRole('button', { name: 'Sign in' }).count(), 1);
});

test('no page needed an inline script or style', () => {
  assert.deepEqual(cspViolations, []);
});
