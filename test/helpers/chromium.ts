import { existsSync, readFileSync } from 'node:fs';
import type { Browser, Page, Response } from 'playwright-core';
import { chromium } from 'playwright-core';

/** Debian's Chromium (package `chromium`); never a browser downloaded by Playwright. */
export const CHROMIUM_PATH = '/usr/bin/chromium';

const ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--no-first-run',
  '--disable-quic',
  '--disable-sync',
];

/**
 * In a before hook: skips the suite with one line when Chromium is missing, but fails under CI,
 * where .ci/run installs it and a skip would hide a broken set-up.
 */
export function requireChromium(ctx: Mocha.Context): void {
  if (existsSync(CHROMIUM_PATH)) return;
  const message = `${CHROMIUM_PATH} not found: install the Debian package chromium (apt-get install chromium)`;
  if (process.env.CI) throw new Error(message);
  process.stdout.write(`  skipping browser tests: ${message}\n`);
  ctx.skip();
}

/** Headless Chromium with a fresh temporary profile; each newContext() is one more isolated user. */
export function launchChromium(): Promise<Browser> {
  return chromium.launch({ executablePath: CHROMIUM_PATH, headless: true, args: ARGS, timeout: 20_000 });
}

/**
 * Everything that went wrong on a page: console errors (CSP violations are reported there), headers
 * Chromium could not apply, uncaught exceptions, failed requests, and responses >= 400 that the
 * test did not announce.
 */
export class PageProblems {
  readonly problems: string[] = [];
  private readonly expected = new Map<string, number>();

  constructor(page: Page) {
    page.on('console', (msg) => {
      // Chromium reports a response header it cannot apply (an unknown Permissions-Policy feature)
      // as a warning that starts "Error with ... header".
      if (msg.type() === 'warning' && /^Error with .* header/.test(msg.text())) {
        this.problems.push(`header not applied on ${page.url()}: ${msg.text()}`);
        return;
      }
      if (msg.type() !== 'error') return;
      const url = msg.location().url;
      const status = /the server responded with a status of (\d+)/.exec(msg.text())?.[1];
      // Chromium logs every error document it loads; only the deliberate ones are fine.
      if (status !== undefined && this.expected.get(url) === Number(status)) return;
      this.problems.push(`console error: ${msg.text()} (${url})`);
    });
    page.on('pageerror', (err) => this.problems.push(`uncaught exception: ${err.message}`));
    page.on('requestfailed', (req) => {
      const error = req.failure()?.errorText ?? '';
      // Chromium fetches the icon after the page loads and cancels it when the tab navigates on.
      if (error === 'net::ERR_ABORTED' && new URL(req.url()).pathname === '/static/favicon.svg') return;
      this.problems.push(`request failed: ${req.url()} ${error}`);
    });
    page.on('response', (res: Response) => {
      if (res.status() >= 400 && this.expected.get(res.url()) !== res.status()) {
        this.problems.push(`unexpected ${res.status()} for ${res.request().method()} ${res.url()}`);
      }
    });
  }

  /** Announces a deliberate error response, so it is not counted as a problem. */
  expect(url: string, status: number): void {
    this.expected.set(url, status);
  }
}

let axeSource: string | undefined;

/** One axe-core violation, short enough to read in a failed assertion. */
export interface AxeViolation {
  id: string;
  impact: string | null;
  help: string;
  targets: string[];
}

/**
 * Runs axe-core on the page as it is served, CSP included. The script goes in through DevTools
 * (page.evaluate), which a page's CSP does not govern; a <script> tag would be blocked by
 * default-src 'none', and bypassCSP would test a page no user gets.
 */
export async function runAxe(page: Page): Promise<AxeViolation[]> {
  axeSource ??= readFileSync(require.resolve('axe-core'), 'utf8');
  await page.evaluate(axeSource);
  return page.evaluate(async () => {
    const axe = (globalThis as unknown as { axe: { run(ctx: Document, opts: object): Promise<AxeResults> } }).axe;
    const results = await axe.run(document, { resultTypes: ['violations'] });
    return results.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, targets: v.nodes.map((n) => n.target.join(' ')) }));
  });
}

interface AxeResults {
  violations: Array<{ id: string; impact: string | null; help: string; nodes: Array<{ target: string[] }> }>;
}

/** One browser window in a side-by-side picture. */
export interface WindowShot {
  caption: string;
  address: string;
  png: Buffer;
}

/**
 * Draws screenshots as browser windows side by side (for the README picture), rendered by the
 * same Chromium on a blank page that has no CSP.
 */
export async function composeSideBySide(browser: Browser, windows: WindowShot[]): Promise<Buffer> {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  try {
    const page = await context.newPage();
    const figures = windows
      .map(
        (w) => `<figure><figcaption>${escapeHtml(w.caption)}</figcaption><div class="window">
          <div class="bar"><i></i><i></i><i></i><span>${escapeHtml(w.address)}</span></div>
          <img alt="" src="data:image/png;base64,${w.png.toString('base64')}"></div></figure>`,
      )
      .join('');
    await page.setContent(`<style>${SIDE_BY_SIDE_CSS}</style><div id="shot">${figures}</div>`);
    return await page.locator('#shot').screenshot();
  } finally {
    await context.close();
  }
}

const SIDE_BY_SIDE_CSS = `
  body { margin: 0; font-family: system-ui, "DejaVu Sans", sans-serif; }
  #shot { display: inline-flex; gap: 28px; padding: 28px 32px 32px; background: #e4e8f0; }
  figure { margin: 0; }
  figcaption { margin: 0 0 10px 4px; font-size: 15px; font-weight: 600; color: #374151; }
  .window { border-radius: 10px; overflow: hidden; background: #fff; box-shadow: 0 10px 30px rgba(17, 24, 39, 0.18); }
  .bar { display: flex; align-items: center; gap: 7px; height: 36px; padding: 0 12px; background: #f1f3f7; border-bottom: 1px solid #dde3ee; }
  .bar i { width: 11px; height: 11px; border-radius: 50%; background: #cfd5df; }
  .bar span { flex: 1; margin-left: 10px; padding: 4px 12px; border-radius: 6px; background: #fff; font-size: 13px; color: #4b5563; }
  img { display: block; }
`;

function escapeHtml(text: string): string {
  return text.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);
}
