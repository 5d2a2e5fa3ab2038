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
  return { subject: leaf.subject.replace(/\n/g, ', '), notAfter: new Date(leaf.validTo) };
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
  /** The files' identity (inode, size, mtime) when last looked at, so unchanged files are not read again. */
  private seen: string | undefined;
  private checking = false;

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

  /** Reads the files again if they changed since last looked at (the first look reads them once). */
  private async check(): Promise<void> {
    if (this.checking) return;
    this.checking = true;
    try {
      const seen = await this.fingerprint();
      if (seen === undefined || seen === this.seen) return;
      this.seen = seen;
      let next: CertificatePair;
      let info: CertificateInfo;
      try {
        next = { cert: await readFile(this.files.cert), key: await readFile(this.files.key) };
        if (next.cert.equals(this.current.cert) && next.key.equals(this.current.key)) return;
        info = checkPair(next);
      } catch (err) {
        this.options.logger.warn(
          { reason: reasonOf(err), cert: this.files.cert, key: this.files.key },
          'STORE_TLS_CERT and STORE_TLS_KEY changed but do not hold a usable pair: still serving the previous certificate',
        );
        return;
      }
      this.current = next;
      for (const listener of this.listeners) listener({ certificate: next.cert, privateKey: next.key });
      this.options.logger.info({ subject: info.subject, notAfter: info.notAfter.toISOString() }, 'TLS certificate reloaded: new connections use it');
      this.loaded(info);
    } finally {
      this.checking = false;
    }
  }

  private loaded(info: CertificateInfo): void {
    this.options.onLoaded(info);
    if (info.notAfter.getTime() <= Date.now()) {
      this.options.logger.warn({ subject: info.subject, notAfter: info.notAfter.toISOString() }, 'the TLS certificate has expired: clients will refuse to connect');
    }
  }

  /** inode, size and modification time of both files; undefined when either cannot be read (kept as it was). */
  private async fingerprint(): Promise<string | undefined> {
    try {
      const [cert, key] = await Promise.all([stat(this.files.cert), stat(this.files.key)]);
      return `${cert.ino}:${cert.size}:${cert.mtimeMs}/${key.ino}:${key.size}:${key.mtimeMs}`;
    } catch (err) {
      if (this.seen !== 'missing') {
        this.options.logger.warn({ reason: reasonOf(err) }, 'cannot read STORE_TLS_CERT or STORE_TLS_KEY: still serving the previous certificate');
      }
      this.seen = 'missing';
      return undefined;
    }
  }
}

/** A system error's code (ENOENT, EACCES); OpenSSL's own words otherwise ("key values mismatch"). */
function reasonOf(err: unknown): string {
  const { syscall, code, message } = err as NodeJS.ErrnoException;
  return (syscall && code) || message.replace(/^error:[0-9A-F]+:[^:]*::?/, '');
}
