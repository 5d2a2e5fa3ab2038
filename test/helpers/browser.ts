/** A tiny HTTP client with a cookie jar, like one browser: real HTTP over fetch, redirects by hand. */
export class CookieJarClient {
  readonly cookies = new Map<string, string>();

  constructor(public base: string) {}

  async request(path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    if (this.cookies.size > 0 && !headers.has('cookie')) {
      headers.set('cookie', [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; '));
    }
    const res = await fetch(this.base + path, { ...init, headers, redirect: 'manual' });
    for (const line of res.headers.getSetCookie()) {
      const [pair, ...attrs] = line.split(';');
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      const expired = attrs.some((a) => /^\s*expires=thu, 01 jan 1970/i.test(a)) || value === '';
      if (expired) this.cookies.delete(name);
      else this.cookies.set(name, value);
    }
    return res;
  }

  get(path: string, headers: Record<string, string> = {}): Promise<Response> {
    return this.request(path, { headers });
  }

  /** POSTs a form; follows a 303 to its Location with a GET, like a browser. */
  async post(path: string, form: Record<string, string>, follow = true): Promise<Response> {
    const res = await this.request(path, {
      method: 'POST',
      body: new URLSearchParams(form).toString(),
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });
    if (follow && res.status === 303) {
      await res.arrayBuffer();
      return this.get(res.headers.get('location')!);
    }
    return res;
  }

  /** GET / and read the counters and the form token from the page. */
  async page(): Promise<{ status: number; count1: number; count2: number; csrf: string; html: string }> {
    const res = await this.get('/');
    return parsePage(res.status, await res.text());
  }
}

export function parsePage(status: number, html: string) {
  const count1 = Number(/Counter 1: (\d+)/.exec(html)?.[1] ?? NaN);
  const count2 = Number(/Counter 2: (\d+)/.exec(html)?.[1] ?? NaN);
  const csrf = /name="_csrf" value="([^"]+)"/.exec(html)?.[1] ?? '';
  return { status, count1, count2, csrf, html };
}
