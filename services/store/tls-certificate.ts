import { X509Certificate } from 'node:crypto';
import { createSecureContext } from 'node:tls';
import { experimental } from '@grpc/grpc-js';
import type { Logger } from '../shared/log';
import { PolledFiles } from '../shared/polled-files';

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

/** Also the labels OpenSSL reads as one: TRUSTED (openssl x509 -trustout) and the old X509. */
const CERTIFICATE = /-----BEGIN (?:TRUSTED |X509 )?CERTIFICATE-----/;
/** PKCS#8 (what openssl req writes), EC, RSA and encrypted keys. */
const PRIVATE_KEY = /-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----/;
/** A key under a passphrase: PKCS#8 (ENCRYPTED PRIVATE KEY) or OpenSSL's traditional PEM (Proc-Type). */
const ENCRYPTED_KEY = /-----BEGIN ENCRYPTED PRIVATE KEY-----|^Proc-Type: *4, *ENCRYPTED/m;

/**
 * Checks that the key belongs to the certificate (the first of the chain) and that both parse, as
 * a TLS handshake would need them. Throws with OpenSSL's reason ("key values mismatch", ...), or,
 * for a file that holds the other kind of PEM (the two swapped, one file given twice), with which
 * one that is: OpenSSL would only say "no start line".
 */
export function checkPair(pair: CertificatePair): CertificateInfo {
  const cert = pair.cert.toString('latin1');
  const key = pair.key.toString('latin1');
  if (!CERTIFICATE.test(cert)) {
    throw new Error(`STORE_TLS_CERT holds no certificate${PRIVATE_KEY.test(cert) ? ', but a private key (are the two files swapped?)' : ''}`);
  }
  if (!PRIVATE_KEY.test(key)) {
    throw new Error(`STORE_TLS_KEY holds no private key${CERTIFICATE.test(key) ? ', but a certificate (are the two files swapped?)' : ''}`);
  }
  // OpenSSL would only say "bad decrypt", as if the file were damaged.
  if (ENCRYPTED_KEY.test(key)) {
    throw new Error('STORE_TLS_KEY holds an encrypted private key, and the store takes no passphrase: give it the key unencrypted (openssl pkey -in <key> -out <new key>)');
  }
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
  private readonly files: PolledFiles<CertificateInfo>;
  private notAfterMs = Infinity;
  private expiryWarned = false;

  constructor(
    paths: { cert: string; key: string },
    initial: CertificatePair,
    private readonly options: { intervalMs: number; logger: Logger; onLoaded(info: CertificateInfo): void },
  ) {
    this.current = initial;
    this.loaded(checkPair(initial));
    const { logger } = options;
    this.files = new PolledFiles(
      [
        { variable: 'STORE_TLS_CERT', path: paths.cert },
        { variable: 'STORE_TLS_KEY', path: paths.key },
      ],
      [initial.cert, initial.key],
      {
        intervalMs: options.intervalMs,
        logger,
        unusable: 'STORE_TLS_CERT and STORE_TLS_KEY do not hold a usable pair now: still serving the previous certificate',
        onLook: () => this.warnIfExpired(),
        check: ([cert, key]) => checkPair({ cert, key }),
        use: ([cert, key], info) => {
          this.current = { cert, key };
          for (const listener of this.listeners) listener({ certificate: cert, privateKey: key });
          logger.info({ subject: info.subject, notAfter: info.notAfter.toISOString() }, 'TLS certificate reloaded: new connections use it');
          this.loaded(info);
        },
      },
    );
  }

  addIdentityCertificateListener(listener: IdentityListener): void {
    this.listeners.add(listener);
    // grpc-js registers its own watcher only after this returns: the first answer must come later.
    process.nextTick(listener, { certificate: this.current.cert, privateKey: this.current.key });
    void this.files.start();
  }

  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.listeners.delete(listener);
    if (this.listeners.size === 0) this.files.stop();
  }

  /** No client certificates are asked for: there is no CA to watch. */
  addCaCertificateListener(): void {}
  removeCaCertificateListener(): void {}

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
