import assert from 'node:assert/strict';
import v8 from 'node:v8';
import vm from 'node:vm';
import { IdSigner, newSessionId } from '../services/web/signed-id';
import { KeyedLock, RecentMoves, type SessionBackend, SessionBusyError, type SessionOptions, sessionMiddleware } from '../services/web/session';

const KEY_A = 'key-a-0123456789-0123456789-0123456789';
const KEY_B = 'key-b-0123456789-0123456789-0123456789';
const BASE64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

/** Never called: these tests only create the middleware. */
const store: SessionBackend = {
  get: () => Promise.reject(new Error('unused')),
  put: () => Promise.reject(new Error('unused')),
  delete: () => Promise.reject(new Error('unused')),
};

describe('session middleware options are checked at creation', () => {
  const bad: Array<[string, Partial<SessionOptions> & Record<string, unknown>, RegExp]> = [
    ['no store', { store: undefined }, /store is required.*get, put and delete/],
    ['a store without delete', { store: { get: store.get, put: store.put } as unknown as SessionBackend }, /store is required/],
    ['no keys', { keys: [] }, /keys: give at least one secret key/],
    ['one key as a string, not in an array', { keys: 'k'.repeat(40) as unknown as string[] }, /keys must be an array of keys .*not one string/],
    ['a short key', { keys: [KEY_A, 'short'] }, /keys\[1\]: every key must be a string of at least 32 characters/],
    ['a cookie name with a space', { cookieName: 'my sid' }, /cookieName must be 1-64 of/],
    ['a cookie name that already has the __Host- prefix', { cookieName: '__Host-sid' }, /not start with "__"/],
    ['a zero idle TTL', { idleTtlMs: 0 }, /idleTtlMs must be a positive integer of milliseconds \(got 0\)/],
    ['a TTL given as a string', { idleTtlMs: '1000' as unknown as number }, /idleTtlMs must be a positive integer of milliseconds \(got "1000"\)/],
    ['an absolute lifetime shorter than the idle timeout', { idleTtlMs: 60_000, absoluteTtlMs: 1000 }, /absoluteTtlMs \(1000\) must be at least idleTtlMs \(60000\)/],
    ['a persistent cookie for longer than browsers keep one (400 days)', { persistent: true, absoluteTtlMs: Number.MAX_SAFE_INTEGER }, /absoluteTtlMs must be at most 34560000000 \(400 days.*with persistent: true/],
    ['an unknown secure policy', { secure: 'sometimes' as 'auto' }, /secure must be 'auto', 'always' or 'never' \(got "sometimes"\)/],
    ['rolling as a string', { rolling: 'yes' as unknown as boolean }, /rolling must be true or false/],
    ['persistent as a number', { persistent: 1 as unknown as boolean }, /persistent must be true or false/],
    ['a misspelt option', { idleTTL: 5 }, /option idleTTL is not known; the options are: store, keys, cookieName, idleTtlMs/],
    ['a queue wait of zero', { maxQueueWaitMs: 0 }, /maxQueueWaitMs must be a positive integer of milliseconds \(got 0\)/],
    ['a queue wait longer than a timer can run (it would fire at once)', { maxQueueWaitMs: 2 ** 31 }, /maxQueueWaitMs must be at most 2147483647 \(about 24.8 days/],
    ['a negative number of remembered sessions', { recentSessions: -1 }, /recentSessions must be a non-negative integer \(got -1\)/],
    ['a callback that is not a function', { onForgedCookie: 'log' as unknown as () => void }, /onForgedCookie must be a function/],
  ];
  for (const [name, override, message] of bad) {
    it(`rejects ${name} with a message saying what to fix`, () => {
      assert.throws(() => sessionMiddleware({ store, keys: [KEY_A], ...override } as SessionOptions), (err: Error) => {
        assert.ok(err instanceof TypeError, `TypeError, got ${err.name}`);
        assert.match(err.message, message);
        return true;
      });
    });
  }

  it('accepts the minimal options (store and keys) and every documented option', () => {
    assert.equal(typeof sessionMiddleware({ store, keys: [KEY_A] }), 'function');
    const full: Required<SessionOptions> = {
      store,
      keys: [KEY_A, KEY_B],
      cookieName: 'app_session',
      idleTtlMs: 1000,
      absoluteTtlMs: 2000,
      rolling: false,
      persistent: true,
      secure: 'always',
      maxUpdateTries: 3,
      regenerateGraceMs: 500,
      maxQueueWaitMs: 2000,
      recentSessions: 100,
      requestId: () => 'r1',
      onForgedCookie: () => undefined,
      onEvent: () => undefined,
    };
    assert.equal(typeof sessionMiddleware(full), 'function');
  });
});

describe('signed ids', () => {
  it('a rotated-out key still verifies while the newest key signs; an unknown key does not verify', () => {
    const id = newSessionId();
    const old = new IdSigner([KEY_A]);
    const rotated = new IdSigner([KEY_B, KEY_A]);
    const cookie = old.prove(id).cookie;
    assert.equal(rotated.verify(cookie)?.id, id);
    assert.notEqual(rotated.prove(id).cookie, cookie, 'the newest key signs');
    assert.equal(new IdSigner([KEY_B]).verify(cookie), undefined);
  });

  it('any changed character of the id or the MAC fails verification, including the low bits of the last one', () => {
    const signer = new IdSigner([KEY_A]);
    for (let n = 0; n < 20; n += 1) {
      const cookie = signer.prove(newSessionId()).cookie;
      for (let i = 0; i < cookie.length; i += 1) {
        if (i === 24) continue;
        // Flipping the lowest bit of a base64 digit: in the last digit those bits are padding a lax decoder ignores.
        const flipped = cookie.slice(0, i) + BASE64URL[BASE64URL.indexOf(cookie[i]) ^ 1] + cookie.slice(i + 1);
        assert.equal(signer.verify(flipped), undefined, `position ${i} of ${cookie}`);
      }
    }
  });

  it('kept proofs change no answer: valid, forged, rotated-key and evicted cookies verify as with an HMAC every time', () => {
    const ids = Array.from({ length: 6 }, () => newSessionId());
    const old = new IdSigner([KEY_A], 0);
    const cookies = ids.flatMap((id) => {
      const own = new IdSigner([KEY_B], 0).prove(id).cookie;
      const forged = own.slice(0, -1) + BASE64URL[BASE64URL.indexOf(own.at(-1)!) ^ 1];
      return [own, forged, old.prove(id).cookie, `${newSessionId()}.${own.slice(25)}`];
    });
    const reference = new IdSigner([KEY_B, KEY_A], 0);
    // Kept proofs: none, fewer than the ids (so some are evicted between uses), all of them.
    for (const kept of [0, 2, 10_000]) {
      const signer = new IdSigner([KEY_B, KEY_A], kept);
      for (let round = 0; round < 3; round += 1) {
        for (const [i, cookie] of cookies.entries()) {
          if (round === 1 && i % 4 === 0) signer.prove(ids[i / 4]); // proving also keeps the proof
          assert.deepEqual(signer.verify(cookie), reference.verify(cookie), `kept ${kept}, round ${round}, cookie ${i}`);
        }
      }
    }
  });

  it('a verified id keeps no reference to the Cookie header it was cut from (remembered ids would keep big headers alive)', () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const signer = new IdSigner([KEY_B, KEY_A]);
    const minters = [new IdSigner([KEY_B], 0), new IdSigner([KEY_A], 0)]; // the signing key, a rotated-out key
    const results: unknown[] = [];
    gc();
    const before = process.memoryUsage().heapUsed;
    for (let i = 0; i < 400; i += 1) {
      const header = `pad=${'x'.repeat(50_000)}${i}; sid=${minters[i % 2].prove(newSessionId()).cookie}; theme=dark`;
      // A capture of a long string, as the cookies package cuts a cookie value out of the header.
      const cookie = /(?:^|; *)sid=([^;]*)/.exec(header)![1];
      results.push(signer.verify(cookie), signer.verify(cookie)); // the HMAC path, then the kept proof
    }
    gc();
    const grownMb = (process.memoryUsage().heapUsed - before) / 1e6;
    assert.ok(results.every((r) => r !== undefined));
    assert.ok(grownMb < 5, `400 verified cookies kept ${grownMb.toFixed(1)} MB alive (their 50 KB headers would be 20 MB)`);
  });

  it('the form token verifies for its own id only and differs from the cookie MAC', () => {
    const signer = new IdSigner([KEY_A]);
    const a = signer.prove(newSessionId());
    const b = signer.prove(newSessionId());
    assert.equal(signer.verifyCsrf(a.id, a.csrf), true);
    assert.equal(signer.verifyCsrf(b.id, a.csrf), false);
    assert.equal(signer.verifyCsrf(a.id, a.cookie.slice(25)), false, 'the cookie MAC is not a form token');
    assert.equal(signer.verifyCsrf(a.id, undefined), false);
    assert.equal(signer.verifyCsrf(a.id, [a.csrf]), false);
    const padded = a.csrf.slice(0, -1) + BASE64URL[BASE64URL.indexOf(a.csrf.at(-1)!) ^ 1];
    assert.equal(signer.verifyCsrf(a.id, padded), false, 'a token differing only in padding bits');
  });
});

describe('recent moves (regenerations known to this process)', () => {
  it('follows a chain of regenerations and forgets them after their grace window', async () => {
    const moves = new RecentMoves();
    moves.remember('a', 'b', 10_000);
    moves.remember('b', 'c', 30);
    assert.equal(moves.resolve('a'), 'c');
    assert.equal(moves.resolve('x'), 'x');
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(moves.resolve('a'), 'b');
  });

  it('a burst of logins costs each one only what expired: 30,000 regenerations in one window stay fast, and expired moves are dropped', async () => {
    const burst = new RecentMoves();
    const start = process.hrtime.bigint();
    for (let i = 0; i < 30_000; i += 1) burst.remember(`old-${i}`, `new-${i}`, 10_000);
    const ms = Number(process.hrtime.bigint() - start) / 1e6;
    // A scan of every move on each login took 4.6 s here (4.5e8 steps); dropping from the front, milliseconds.
    assert.ok(ms < 1000, `30,000 regenerations took ${ms.toFixed(0)} ms`);
    assert.equal(burst.size, 30_000);
    assert.equal(burst.resolve('old-0'), 'new-0');
    const moves = new RecentMoves();
    for (let i = 0; i < 5_000; i += 1) moves.remember(`old-${i}`, `new-${i}`, 40);
    await new Promise((resolve) => setTimeout(resolve, 60));
    moves.remember('next', 'after', 40);
    assert.equal(moves.size, 1, 'the expired moves are gone');
    assert.equal(moves.resolve('old-0'), 'old-0');
  });
});

describe('per-session lock (updates of one session within a process run one after another)', () => {
  it('runs tasks of one key in order, never two at once, and tasks of other keys alongside', async () => {
    const lock = new KeyedLock();
    const log: string[] = [];
    const running = new Map<string, number>();
    const task = (name: string, ms: number) => async () => {
      const key = name[0];
      running.set(key, (running.get(key) ?? 0) + 1);
      assert.equal(running.get(key), 1, `two tasks of key ${key} ran at once`);
      log.push(`start ${name}`);
      await new Promise((r) => setTimeout(r, ms));
      log.push(`end ${name}`);
      running.set(key, running.get(key)! - 1);
      return name;
    };
    const results = await Promise.all([lock.run('a', task('a1', 20)), lock.run('a', task('a2', 1)), lock.run('b', task('b1', 5))]);
    assert.deepEqual(results, ['a1', 'a2', 'b1']);
    assert.ok(log.indexOf('end a1') < log.indexOf('start a2'), log.join(', '));
    assert.ok(log.indexOf('start b1') < log.indexOf('end a1'), log.join(', '));
  });

  it('a task that throws, even before returning a promise, fails alone and frees the key for the next', async () => {
    const lock = new KeyedLock();
    const thrower = (() => {
      throw new Error('boom');
    }) as unknown as () => Promise<string>;
    await assert.rejects(lock.run('k', thrower), /boom/);
    await assert.rejects(lock.run('k', () => Promise.reject(new Error('later'))), /later/);
    assert.equal(await lock.run('k', async () => 'next'), 'next');
  });

  it('a task that waits longer than maxWaitMs gives up without running; the tasks behind it still wait for the ones before it', async () => {
    const lock = new KeyedLock(0, 200);
    const log: string[] = [];
    const slow = lock.run('k', async () => {
      await new Promise((r) => setTimeout(r, 300));
      log.push('slow');
      return 'slow';
    });
    const startedAt = Date.now();
    const waiting = lock.run('k', async () => {
      log.push('waiting ran');
      return 'waiting';
    });
    await assert.rejects(waiting, (err: Error) => err instanceof SessionBusyError && err.status === 503);
    assert.ok(Date.now() - startedAt < 290, 'it gave up after about maxWaitMs, not after the slow task');
    const next = lock.run('k', async () => {
      log.push('next');
      return 'next';
    });
    assert.deepEqual(await Promise.all([slow, next]), ['slow', 'next']);
    assert.deepEqual(log, ['slow', 'next'], 'the task that gave up never ran, and the next one waited for the slow one');
  });
});
