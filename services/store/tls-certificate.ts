import { X509Certificate } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { createSecureContext } from 'node:tls';
import { experimental } from '@grpc/grpc-js';
import type { Logger } from '../shared/log';

/** The store's certificate chain and private key, as PEM. */
export interface CertificatePair {
  cert: Buffer;
  key: Buffer;
}

/** What an operator needs to know of a certificate: whom it names and until when it is valid. */
export interface CertificateInfo {
  subject: string;
  notAfter: Date;
}

/**
 * Checks that the key belongs to the certificate (the first of the chain) and that both parse, as
 * a TLS handshake would need them. Throws with OpenSSL's reason ("key values mismatch", ...).
 */
export function checkPair(pair: CertificatePair): CertificateInfo {
  createSecureContext({ cert: pair.cert, key: pair.key });
  const leaf = new X509Certificate(pair.cert);
  const notAfter = new Date(leaf.validTo);
  if (Number.isNaN(notAfter.getTime())) throw new Error(`the certificate's expiry cannot be read (${JSON.stringify(leaf.validTo)})`);
  return { subject: leaf.subject.replace(/\n/g, ', '), notAfter };
}

type IdentityListener = experimental.IdentityCertificateUpdateListener;

/**
 * The store's TLS identity, read again from STORE_TLS_CERT and STORE_TLS_KEY whenever either file
 * changes (checked every intervalMs), so that a renewed certificate (cert-manager, certbot, a
 * rotated Kubernetes secret) is served without a restart. New connections get the new
 * certificate; open ones, such as the web's long-lived stream, keep the one they were made with.
 *
 * A pair that does not work (a key that does not match, a file half written or unreadable) is
 * never handed to the server, which would then refuse every new connection: the previous
 * certificate stays in use and a warning says why, until the files hold a good pair again.
 */
export class ReloadingCertificate implements experimental.CertificateProvider {
  private current: CertificatePair;
  private readonly listeners = new Set<IdentityListener>();
  private timer: NodeJS.Timeout | undefined;
  /**
   * The files' identity (inode, size, modification and change times) when they last gave a usable
   * pair, so unchanged files are not read again. A failed look leaves it as it was: the files are
   * looked at again next time, as fixing them may change none of this (chmod changes only ctime,
   * a directory's permissions nothing of the file).
   */
  private seen: string | undefined;
  /** Why the last look failed, so a failure that lasts is warned about once, not at every look. */
  private failure: string | undefined;
  private checking = false;
  private notAfterMs = Infinity;
  private expiryWarned = false;

  constructor(
    private readonly files: { cert: string; key: string },
    initial: CertificatePair,
    private readonly options: { intervalMs: number; logger: Logger; onLoaded(info: CertificateInfo): void },
  ) {
    this.current = initial;
    this.loaded(checkPair(initial));
  }

  addIdentityCertificateListener(listener: IdentityListener): void {
    this.listeners.add(listener);
    // grpc-js registers its own watcher only after this returns: the first answer must come later.
    process.nextTick(listener, { certificate: this.current.cert, privateKey: this.current.key });
    if (!this.timer && this.options.intervalMs > 0) {
      this.timer = setInterval(() => void this.check(), this.options.intervalMs).unref();
    }
  }

  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.listeners.delete(listener);
    if (this.listeners.size === 0) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  /** No client certificates are asked for: there is no CA to watch. */
  addCaCertificateListener(): void {}
  removeCaCertificateListener(): void {}

  /** Reads the files again if they changed since they last gave a usable pair (the first look reads them once). */
  private async check(): Promise<void> {
    if (this.checking) return;
    this.checking = true;
    try {
      this.warnIfExpired();
      let seen: string;
      let next: CertificatePair;
      let info: CertificateInfo;
      try {
        seen = (await Promise.all([fingerprint('STORE_TLS_CERT', this.files.cert), fingerprint('STORE_TLS_KEY', this.files.key)])).join('/');
        if (seen === this.seen) return;
        next = { cert: await read('STORE_TLS_CERT', this.files.cert), key: await read('STORE_TLS_KEY', this.files.key) };
        if (next.cert.equals(this.current.cert) && next.key.equals(this.current.key)) {
          this.seen = seen;
          this.failure = undefined;
          return;
        }
        info = checkPair(next);
      } catch (err) {
        const reason = reasonOf(err);
        if (reason !== this.failure) {
          this.options.logger.warn(
            { reason, cert: this.files.cert, key: this.files.key },
            'STORE_TLS_CERT and STORE_TLS_KEY do not hold a usable pair now: still serving the previous certificate',
          );
        }
        this.failure = reason;
        return;
      }
      this.seen = seen;
      this.failure = undefined;
      this.current = next;
      for (const listener of this.listeners) listener({ certificate: next.cert, privateKey: next.key });
      this.options.logger.info({ subject: info.subject, notAfter: info.notAfter.toISOString() }, 'TLS certificate reloaded: new connections use it');
      this.loaded(info);
    } catch (err) {
      this.options.logger.error({ err }, 'looking for a renewed TLS certificate failed: still serving the previous certificate');
    } finally {
      this.checking = false;
    }
  }

  private loaded(info: CertificateInfo): void {
    this.options.onLoaded(info);
    this.notAfterMs = info.notAfter.getTime();
    this.expiryWarned = false;
    this.warnIfExpired();
  }

  /** Once per certificate, when it is (or becomes, while served) past its notAfter. */
  private warnIfExpired(): void {
    if (this.expiryWarned || Date.now() < this.notAfterMs) return;
    this.expiryWarned = true;
    this.options.logger.warn({ notAfter: new Date(this.notAfterMs).toISOString() }, 'the TLS certificate has expired: clients will refuse to connect');
  }
}

/** inode, size, modification and change time of a file. */
async function fingerprint(variable: string, file: string): Promise<string> {
  const s = await naming(variable, stat(file));
  return `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`;
}

function read(variable: string, file: string): Promise<Buffer> {
  return naming(variable, readFile(file));
}

/** The same work, failing with the variable that names the file and the reason ("STORE_TLS_KEY: EACCES"). */
function naming<T>(variable: string, work: Promise<T>): Promise<T> {
  return work.catch((err: unknown) => {
    throw new Error(`${variable}: ${reasonOf(err)}`);
  });
}

/** A system error's code (ENOENT, EACCES); OpenSSL's own words otherwise ("x509 certificate routines::key values mismatch"). */
function reasonOf(err: unknown): string {
  const { syscall, code, message } = err as NodeJS.ErrnoException;
  return (syscall && code) || message.replace(/^error:[0-9A-F]+:/, '');
}
