import type { IncomingMessage, ServerResponse } from 'node:http';
import helmet, { type HelmetOptions } from 'helmet';
import type Koa from 'koa';

/** Response headers as [name, value] pairs, worked out once. */
export type HeaderList = ReadonlyArray<readonly [string, string]>;

/**
 * helmet's response headers for these options, worked out once at start-up, plus `extra` (fixed
 * headers helmet has no option for): the same headers helmet chooses, without running its dozen
 * middleware (and a promise) per request. Only options whose headers do not depend on the request
 * are accepted (no CSP directive functions such as per-request nonces): the headers are checked to
 * come out the same for two different requests.
 */
export function securityHeaderList(options: HelmetOptions, extra: Record<string, string> = {}): HeaderList {
  const chosen = captureHeaders(options, '/');
  const again = captureHeaders(options, '/other?x=1');
  if (JSON.stringify(chosen) !== JSON.stringify(again)) {
    throw new TypeError('securityHeaders: these helmet options give request-dependent headers; set them with helmet per request instead');
  }
  return [...chosen, ...Object.entries(extra)];
}

/** Sets these headers on every response. */
export function securityHeaders(headers: HeaderList): Koa.Middleware {
  const names = headers.map(([name]) => name);
  const values = headers.map(([, value]) => value);
  return (ctx, next) => {
    const res = ctx.res;
    for (let i = 0; i < names.length; i += 1) res.setHeader(names[i], values[i]);
    return next();
  };
}

/**
 * Permissions-Policy for a site that uses none of the browser's powerful features: no document of
 * this origin, nor any frame it could embed, may ask for the camera, the microphone, the location,
 * payments and the like. Only long-standing features of the specification are listed: Chromium
 * warns in the console of every page about a feature it does not know (the browser tests fail on
 * that), and experimental ones come and go.
 */
export const PERMISSIONS_POLICY = [
  'accelerometer',
  'camera',
  'display-capture',
  'geolocation',
  'gyroscope',
  'magnetometer',
  'microphone',
  'midi',
  'payment',
  'usb',
]
  .map((feature) => `${feature}=()`)
  .join(', ');

/** The Strict-Transport-Security max-age helmet sends by default: one year, in seconds. */
export const HSTS_ONE_YEAR_S = 365 * 24 * 60 * 60;

/**
 * Strict-Transport-Security on responses to HTTPS requests (ctx.secure: a TLS socket, or
 * X-Forwarded-Proto: https when the app trusts its proxy). Browsers ignore it over plain HTTP, and
 * a site reached at http://localhost must never pin itself to HTTPS. No includeSubDomains: that
 * decides for every other host under the domain, which is not this app's to decide. Undefined for
 * maxAgeS 0 (none sent).
 */
export function strictTransportSecurity(maxAgeS: number): Koa.Middleware | undefined {
  if (!Number.isSafeInteger(maxAgeS) || maxAgeS < 0) throw new RangeError(`strictTransportSecurity: max-age must be a whole number of seconds, got ${maxAgeS}`);
  if (maxAgeS === 0) return undefined;
  const value = `max-age=${maxAgeS}`;
  return (ctx, next) => {
    if (ctx.secure) ctx.res.setHeader('Strict-Transport-Security', value);
    return next();
  };
}

function captureHeaders(options: HelmetOptions, url: string): Array<[string, string]> {
  const set = new Map<string, string>();
  const res = {
    setHeader(name: string, value: unknown) {
      set.set(name, String(value));
      return res;
    },
    removeHeader(name: string) {
      set.delete(name);
    },
  };
  let failure: unknown;
  let done = false;
  helmet(options)({ url, method: 'GET', headers: {} } as IncomingMessage, res as unknown as ServerResponse, (err?: unknown) => {
    failure = err;
    done = true;
  });
  if (!done || failure) throw new TypeError(`securityHeaders: helmet did not finish synchronously${failure ? `: ${String(failure)}` : ''}`);
  return [...set];
}
