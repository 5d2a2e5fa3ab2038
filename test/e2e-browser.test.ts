import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { composeSideBySide, launchChromium, PageProblems, requireChromium, runAxe } from './helpers/chromium';
import { type Proc, root, startStore, startWeb, tempDir } from './helpers/procs';

const SIGNED_ID = /^[A-Za-z0-9_-]{24}\.[A-Za-z0-9_-]{22}$/;
const ARTIFACTS = path.join(root, 'test', 'artifacts');
/** Sized so the whole page fits without empty space: these screenshots become the README picture. */
const SHOT_VIEWPORT = { width: 720, height: 520 };

/** One person with their own browser profile (an isolated context) and one tab. */
interface User {
  context: BrowserContext;
  page: Page;
  problems: PageProblems;
}

describe('in Chromium: two users on the counter page, and the error pages', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let web: Proc;
  let base: string;
  let browser: Browser;
  let users: User[] = [];

  before(async function () {
    requireChromium(this);
    tmp = tempDir();
    [browser, store] = await Promise.all([launchChromium(), startStore(tmp.dir)]);
    web = await startWeb(store.port, tmp.dir, { STORE_DEADLINE_MS: '2000' });
    base = `http://127.0.0.1:${web.port}`;
  });
  afterEach(async () => {
    await Promise.all(users.map((u) => u.context.close()));
    users = [];
  });
  after(async () => {
    await browser?.close();
    await web?.stop();
    await store?.stop();
    tmp?.remove();
  });

  async function openUser(viewport = { width: 720, height: 640 }): Promise<User> {
    const context = await browser.newContext({ viewport });
    const page = await context.newPage();
    const user = { context, page, problems: new PageProblems(page) };
    users.push(user);
    return user;
  }

  function assertNoProblems(): void {
    assert.deepEqual(
      users.flatMap((u) => u.problems.problems),
      [],
      'no console errors, CSP blocks, failed requests or unexpected error responses',
    );
  }

  it('walkthrough: first load 0/0, reloads raise counter 1, "Increment Counter 2" raises both, two users are independent, "Reset" is 0/0 under a new cookie', async () => {
    const a = await openUser(SHOT_VIEWPORT);
    const b = await openUser(SHOT_VIEWPORT);

    await a.page.goto(base + '/');
    assert.deepEqual(await counters(a.page), [0, 0]);
    await a.page.reload();
    assert.deepEqual(await counters(a.page), [1, 0]);
    await a.page.reload();
    assert.deepEqual(await counters(a.page), [2, 0]);
    await press(a.page, 'Increment Counter 2');
    assert.deepEqual(await counters(a.page), [3, 1], 'the button adds 1 to counter 2 and the page it leads back to adds 1 to counter 1');

    await b.page.goto(base + '/');
    assert.deepEqual(await counters(b.page), [0, 0], 'a second user starts at 0/0');
    await press(b.page, 'Increment Counter 2');
    await press(b.page, 'Increment Counter 2');
    await b.page.reload();
    assert.deepEqual(await counters(b.page), [3, 2]);
    await a.page.reload();
    assert.deepEqual(await counters(a.page), [4, 1], "the second user's clicks did not touch the first user's counters");

    const before = await sidCookie(a.context);
    await press(a.page, 'Reset');
    assert.deepEqual(await counters(a.page), [0, 0]);
    const after = await sidCookie(a.context);
    assert.match(after, SIGNED_ID);
    assert.notEqual(after, before, 'Reset starts a new session under a new id');
    await a.page.reload();
    assert.deepEqual(await counters(a.page), [1, 0]);
    await b.page.reload();
    assert.deepEqual(await counters(b.page), [4, 2], "the first user's reset did not touch the second user's counters");

    mkdirSync(ARTIFACTS, { recursive: true });
    const shots = [await a.page.screenshot(), await b.page.screenshot()];
    writeFileSync(path.join(ARTIFACTS, 'browser-a.png'), shots[0]);
    writeFileSync(path.join(ARTIFACTS, 'browser-b.png'), shots[1]);
    const sideBySide = await composeSideBySide(browser, [
      { caption: 'First browser', address: 'localhost:5000', png: shots[0] },
      { caption: 'Second browser', address: 'localhost:5000', png: shots[1] },
    ]);
    writeFileSync(path.join(ARTIFACTS, 'side-by-side.png'), sideBySide);
    assertNoProblems();
  });

  it('the only cookie is the HttpOnly, SameSite=Lax signed id, and the counters appear nowhere but in the page text', async () => {
    const { context, page } = await openUser();
    await page.goto(base + '/');
    await page.reload();
    await press(page, 'Increment Counter 2');
    assert.deepEqual(await counters(page), [2, 1]);

    const cookies = await context.cookies();
    assert.equal(cookies.length, 1, 'exactly one cookie');
    const [cookie] = cookies;
    assert.equal(cookie.name, 'sid');
    assert.match(cookie.value, SIGNED_ID, 'the value is only <id>.<signature>');
    assert.equal(cookie.httpOnly, true);
    assert.equal(cookie.sameSite, 'Lax');
    assert.equal(cookie.path, '/');

    const client = await page.evaluate(() => ({
      localStorage: localStorage.length,
      sessionStorage: sessionStorage.length,
      documentCookie: document.cookie,
      url: location.href,
    }));
    assert.deepEqual(client, { localStorage: 0, sessionStorage: 0, documentCookie: '', url: base + '/' });

    // Two loads of the same session differ in the counter text and nowhere else: not in the
    // cookie, headers, attributes, hidden fields or URL.
    const first = (await page.reload())!;
    const html1 = await first.text();
    const second = (await page.reload())!;
    const html2 = await second.text();
    assert.notEqual(html1, html2);
    const withoutCounts = (html: string) => html.replace(/Counter ([12]): \d+/g, 'Counter $1: N');
    assert.equal(withoutCounts(html1), withoutCounts(html2));
    assert.equal(html2.match(/Counter 1: \d+/g)?.length, 1);
    const headers = async (res: typeof first) => {
      // Date and the per-request X-Request-Id differ by design.
      const { date: _date, 'x-request-id': _requestId, ...rest } = await res.allHeaders();
      return rest;
    };
    assert.deepEqual(await headers(first), await headers(second));
    assert.deepEqual(await context.cookies(), cookies, 'the cookie did not change while the counters did');
    assert.deepEqual(await counters(page), [4, 1]);
    assertNoProblems();
  });

  it('the counter page has no axe-core accessibility violations, a proper title, no scripts, and nothing blocked by its CSP', async () => {
    const { page } = await openUser();
    const res = (await page.goto(base + '/'))!;
    assert.match(res.headers()['content-security-policy'], /default-src 'none'/, 'the page is checked under its real CSP');
    assert.equal(await page.title(), 'Session counters');
    assert.deepEqual(await runAxe(page), []);
    assert.ok((await stylesheetRules(page)) > 0, 'the stylesheet loaded under the CSP');
    assert.equal(await page.evaluate(() => document.scripts.length), 0, 'plain forms, no JavaScript');
    assertNoProblems();
  });

  it('a double-click on "Reset" ends on the fresh counters, not on an error page', async () => {
    const { page, problems } = await openUser();
    await page.goto(base + '/');
    await page.reload();
    assert.deepEqual(await counters(page), [1, 0]);
    // The second click lands while the first reset's answer is still on its way (held here, as a
    // slow network holds it): the store has deleted the session and the cookie is cleared, but the
    // old page, with its form, is still on screen.
    let answered!: () => void;
    const firstAnswered = new Promise<void>((resolve) => (answered = resolve));
    let first = true;
    await page.route(base + '/reset', async (route) => {
      if (!first) return route.continue();
      first = false;
      await route.fetch({ maxRedirects: 0 });
      answered();
    });
    const box = (await page.getByRole('button', { name: 'Reset', exact: true }).boundingBox())!;
    // The mouse, not locator.click(), which would wait for the first click's navigation.
    await page.mouse.click(box.x + box.width / 2, box.y + box.height / 2);
    await firstAnswered;
    const loaded = page.waitForEvent('load');
    await page.mouse.click(box.x + box.width / 2, box.y + box.height / 2);
    await loaded;
    await page.unrouteAll({ behavior: 'ignoreErrors' });
    assert.equal(page.url(), base + '/');
    assert.deepEqual(await counters(page), [0, 0]);
    assert.deepEqual(problems.problems, [`request failed: ${base}/reset net::ERR_ABORTED`], 'only the first click\'s request, replaced by the second');
  });

  it('keyboard: Tab reaches both buttons with a visible focus ring, and Enter on "Increment Counter 2" submits it', async () => {
    const { page } = await openUser();
    await page.goto(base + '/');
    const focused = new Map<string, FocusLook>();
    for (let i = 0; i < 6 && focused.size < 2; i += 1) {
      await page.keyboard.press('Tab');
      const look = await focusLook(page);
      if (look.text === 'Increment Counter 2' || look.text === 'Reset') focused.set(look.text, look);
    }
    assert.deepEqual([...focused.keys()], ['Increment Counter 2', 'Reset'], 'Tab reaches both buttons, in reading order');
    for (const [name, look] of focused) {
      assert.notEqual(look.outlineStyle, 'none', `${name} shows a focus ring`);
      assert.ok(look.outlineWidth >= 2, `${name}'s focus ring is at least 2 px (${look.outlineWidth})`);
    }
    const resting = await page.getByRole('button', { name: 'Increment Counter 2' }).evaluate((el) => getComputedStyle(el).outlineStyle);
    assert.equal(resting, 'none', 'without focus there is no ring, so focus is visibly different');

    await page.keyboard.press('Shift+Tab');
    assert.equal((await focusLook(page)).text, 'Increment Counter 2');
    const loaded = page.waitForEvent('load');
    await page.keyboard.press('Enter');
    await loaded;
    assert.deepEqual(await counters(page), [1, 1]);
    assertNoProblems();
  });

  it('at 320 px wide nothing overflows sideways, on the counter page and on an error page', async () => {
    const { page, problems } = await openUser({ width: 320, height: 640 });
    for (const url of [base + '/', base + '/narrow/missing']) {
      if (url.endsWith('missing')) problems.expect(url, 404);
      await page.goto(url);
      await assertFitsWidth(page, 320);
    }
    assertNoProblems();
  });

  // 24 px is Chrome's "Very large"; 32 px is text at 200%, which WCAG 1.4.4 asks a page to survive.
  for (const size of [24, 32]) {
    it(`with the browser set to a large text size (${size} px), nothing overflows sideways at 320 px`, async () => {
      const { context, page, problems } = await openUser({ width: 320, height: 640 });
      // The user's default font size, as the browser's settings (or a phone's text scaling) set it: rem grows, px does not.
      const cdp = await context.newCDPSession(page);
      await cdp.send('Page.enable');
      await cdp.send('Page.setFontSizes', { fontSizes: { standard: size, fixed: size } });
      for (const url of [base + '/', base + '/large-text/missing']) {
        if (url.endsWith('missing')) problems.expect(url, 404);
        await page.goto(url);
        assert.equal(await page.evaluate(() => getComputedStyle(document.documentElement).fontSize), `${size}px`, 'the text size setting applies');
        await assertFitsWidth(page, 320);
      }
      assertNoProblems();
    });
  }

  describe('error pages share the layout, say what happened and what to do, and pass axe', () => {
    it('404: an unknown address', async () => {
      const { page, problems } = await openUser();
      const url = base + '/no/such/page';
      problems.expect(url, 404);
      const res = (await page.goto(url))!;
      assert.equal(res.status(), 404);
      await assertErrorPage(page, 404, 'Page not found', /nothing at this address/);
      await page.getByRole('link', { name: 'Back to the counters' }).click();
      await page.waitForURL(base + '/');
      assert.deepEqual(await counters(page), [0, 0]);
      assertNoProblems();
    });

    it('403: a form whose token was tampered with changes nothing', async () => {
      const { page, problems } = await openUser();
      await page.goto(base + '/');
      await page.evaluate(() => {
        for (const input of document.querySelectorAll<HTMLInputElement>('input[name="_csrf"]')) {
          // The first character: all of its bits count (the last one of a base64 MAC carries padding).
          input.value = (input.value.startsWith('A') ? 'B' : 'A') + input.value.slice(1);
        }
      });
      problems.expect(base + '/increment', 403);
      const res = await pressForResponse(page, 'Increment Counter 2');
      assert.equal(res, 403);
      await assertErrorPage(page, 403, 'Form not accepted', /Nothing was changed/);
      await page.getByRole('link', { name: 'Back to the counters' }).click();
      await page.waitForURL(base + '/');
      assert.deepEqual(await counters(page), [1, 0], 'counter 2 was not incremented');
      await press(page, 'Increment Counter 2');
      assert.deepEqual(await counters(page), [2, 1], 'the fresh form works');
      assertNoProblems();
    });

    it("403: a form sent without the session cookie (cookies blocked or cleared) says the counters need a cookie", async () => {
      const { context, page, problems } = await openUser();
      await page.goto(base + '/');
      await context.clearCookies();
      problems.expect(base + '/increment', 403);
      assert.equal(await pressForResponse(page, 'Increment Counter 2'), 403);
      await assertErrorPage(page, 403, 'Form not accepted', /without this site's session cookie/);
      assert.match(await page.locator('.todo').innerText(), /allow cookies for this site/);
      await page.getByRole('link', { name: 'Back to the counters' }).click();
      await page.waitForURL(base + '/');
      await press(page, 'Increment Counter 2');
      assert.deepEqual(await counters(page), [1, 1], 'with the cookie back, the button works');
      assertNoProblems();
    });

    it('400: a form body the server cannot read (claims gzip, is not) changes nothing', async () => {
      const { page, problems } = await openUser();
      await page.goto(base + '/');
      await page.route(base + '/increment', (route) =>
        route.continue({ headers: { ...route.request().headers(), 'content-encoding': 'gzip' }, postData: 'this is not gzip' }),
      );
      problems.expect(base + '/increment', 400);
      assert.equal(await pressForResponse(page, 'Increment Counter 2'), 400);
      await assertErrorPage(page, 400, 'Bad request', /could not read what your browser sent/);
      await page.unrouteAll();
      await page.getByRole('link', { name: 'Back to the counters' }).click();
      await page.waitForURL(base + '/');
      assert.deepEqual(await counters(page), [1, 0], 'counter 2 was not incremented');
      assertNoProblems();
    });

    it("431: a browser holding too many cookies for the site is told to clear them, on a whole page that needs no other request (they would be refused too), and after clearing them the counters work", async () => {
      const { context, page } = await openUser();
      // What other apps on the same host might leave behind: more cookie bytes than Node reads.
      // Set before the first visit, so nothing of the site is in the browser's cache.
      await context.addCookies(Array.from({ length: 6 }, (_, i) => ({ name: `big${i}`, value: 'x'.repeat(3_500), url: base })));
      const requested: string[] = [];
      page.on('request', (req) => requested.push(req.url()));
      users.at(-1)!.problems.expect(base + '/', 431);
      const res = (await page.goto(base + '/'))!;
      assert.equal(res.status(), 431);
      await assertErrorPage(page, 431, 'Request headers too large', /too many or too large cookies for this site/);
      assert.match(await page.locator('.todo').innerText(), /Clear this site's cookies/);
      assert.deepEqual(requested, [base + '/'], 'no request for a stylesheet or an icon');
      await context.clearCookies();
      await page.getByRole('link', { name: 'Back to the counters' }).click();
      await page.waitForURL(base + '/');
      assert.deepEqual(await counters(page), [0, 0]);
      assertNoProblems();
    });

    // Last, because it stops the store (recovery after an outage is proven in web.test.ts).
    it('503: the store process dies, and the page says the counters are unavailable and nothing was lost', async () => {
      const { page, problems } = await openUser();
      await page.goto(base + '/');
      assert.deepEqual(await counters(page), [0, 0]);
      await store.stop('SIGKILL');
      // Once the web has seen the connection close: a write sent onto it before that would be
      // answered with the other 503 page (not known whether saved), rightly, since it was sent.
      const deadline = Date.now() + 5000;
      const readyStatus = async () => {
        const res = await fetch(base + '/readyz');
        await res.arrayBuffer();
        return res.status;
      };
      while ((await readyStatus()) !== 503) {
        assert.ok(Date.now() < deadline, '/readyz still 200 5 s after the store died');
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      problems.expect(base + '/', 503);
      const res = (await page.reload())!;
      assert.equal(res.status(), 503);
      assert.equal(res.headers()['retry-after'], '1');
      await assertErrorPage(page, 503, 'Counters unavailable', /session store is not available right now/);
      // The page a phone meets while the store is down fits its screen at large text sizes too.
      await page.setViewportSize({ width: 320, height: 640 });
      const cdp = await page.context().newCDPSession(page);
      await cdp.send('Page.enable');
      for (const size of [24, 32]) {
        await cdp.send('Page.setFontSizes', { fontSizes: { standard: size, fixed: size } });
        assert.equal((await page.reload())!.status(), 503);
        await assertFitsWidth(page, 320);
      }
      assertNoProblems();
    });
  });

  /** Error page checks shared by every status: wording, layout and stylesheet, a way back, axe. */
  async function assertErrorPage(page: Page, status: number, title: string, happened: RegExp): Promise<void> {
    assert.equal(await page.title(), `${title} · Session counters`);
    assert.equal(await page.locator('h1').textContent(), title);
    assert.equal(await page.locator('.status').textContent(), `Error ${status}`);
    assert.match((await page.locator('main').innerText()), happened);
    assert.ok((await page.locator('.todo').innerText()).length > 10, 'says what to do');
    assert.equal(await page.getByRole('link', { name: 'Back to the counters' }).getAttribute('href'), '/');
    assert.equal(await page.locator('footer').count(), 1, 'the shared layout');
    assert.ok((await stylesheetRules(page)) > 0, 'the shared stylesheet loaded');
    assert.deepEqual(await runAxe(page), []);
  }
});

/** Nothing on the page reaches past the right edge of a viewport this wide. */
async function assertFitsWidth(page: Page, width: number): Promise<void> {
  const widths = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    widest: Math.max(...[...document.querySelectorAll('body *')].map((el) => el.getBoundingClientRect().right)),
  }));
  const url = page.url();
  assert.ok(widths.scroll <= width, `${url}: page is ${widths.scroll} px wide`);
  assert.ok(widths.widest <= width, `${url}: an element reaches ${widths.widest} px`);
}

/** The two counters as rendered text, e.g. "Counter 1: 3". */
async function counters(page: Page): Promise<[number, number]> {
  const text = await page.locator('main').innerText();
  const one = /Counter 1: (\d+)/.exec(text);
  const two = /Counter 2: (\d+)/.exec(text);
  assert.ok(one && two, `both counters are on the page:\n${text}`);
  return [Number(one[1]), Number(two[1])];
}

/** Clicks a form button and waits until the page it leads to has loaded. */
async function press(page: Page, name: string): Promise<void> {
  const loaded = page.waitForEvent('load');
  await page.getByRole('button', { name, exact: true }).click();
  await loaded;
}

/** Clicks a form button and returns the status of the POST's response, once the page has loaded. */
async function pressForResponse(page: Page, name: string): Promise<number> {
  const loaded = page.waitForEvent('load');
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'POST'),
    page.getByRole('button', { name, exact: true }).click(),
  ]);
  await loaded;
  return response.status();
}

async function sidCookie(context: BrowserContext): Promise<string> {
  const cookies = await context.cookies();
  assert.equal(cookies.length, 1);
  return cookies[0].value;
}

function stylesheetRules(page: Page): Promise<number> {
  return page.evaluate(() => [...document.styleSheets].reduce((n, sheet) => n + sheet.cssRules.length, 0));
}

interface FocusLook {
  text: string;
  outlineStyle: string;
  outlineWidth: number;
}

function focusLook(page: Page): Promise<FocusLook> {
  return page.evaluate(() => {
    const el = document.activeElement as HTMLElement;
    const style = getComputedStyle(el);
    return { text: el.textContent?.trim() ?? '', outlineStyle: style.outlineStyle, outlineWidth: parseFloat(style.outlineWidth) };
  });
}
