import { X509Certificate } from 'node:crypto';
import { experimental } from '@grpc/grpc-js';
import type { Logger } from '../shared/log';
import { PolledFiles } from '../shared/polled-files';

const CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

/**
 * The certificates of a PEM bundle; throws unless it holds at least one, each one is whole (a
 * bundle cut short after its first certificates would trust only those) and parses.
 */
export function checkCa(pem: Buffer): X509Certificate[] {
  const text = pem.toString('latin1');
  const blocks = text.match(CERTIFICATE) ?? [];
  if (blocks.length === 0) throw new Error('no certificate in the file');
  const begun = text.split('-----BEGIN CERTIFICATE-----').length - 1;
  if (begun !== blocks.length) throw new Error(`a certificate in the file is cut short (${begun} begun, ${blocks.length} whole)`);
  return blocks.map((block) => new X509Certificate(block));
}

type CaListener = experimental.CaCertificateUpdateListener;

/**
 * The CA certificates a client trusts for the store (STORE_TLS_CA), read again whenever the file
 * changes (looked at every intervalMs), so that a renewed self-signed store certificate or a
 * rotated CA bundle (cert-manager's trust-manager, a mounted ConfigMap) is trusted without a
 * restart. New connections trust what the file holds now; open ones (the Pipe stream) go on.
 * A file that does not hold only whole, readable certificates (half written, cut short,
 * unreadable) is never used: the previous certificates stay trusted and a warning says why.
 */
export class ReloadingCa implements experimental.CertificateProvider {
  private current: Buffer;
  private readonly listeners = new Set<CaListener>();
  private readonly files: PolledFiles<X509Certificate[]>;

  constructor(variable: string, path: string, initial: Buffer, options: { intervalMs: number; logger: Logger }) {
    this.current = initial;
    const { logger } = options;
    this.files = new PolledFiles([{ variable, path }], [initial], {
      intervalMs: options.intervalMs,
      logger,
      unusable: `${variable} does not hold usable certificates now: still trusting the previous ones`,
      check: ([pem]) => checkCa(pem),
      use: ([pem], certificates) => {
        this.current = pem;
        for (const listener of this.listeners) listener({ caCertificate: pem });
        logger.info(
          { certificates: certificates.map((c) => ({ subject: c.subject.replace(/\n/g, ', '), notAfter: new Date(c.validTo).toISOString() })) },
          `${variable} reloaded: new connections to the store trust it`,
        );
      },
    });
  }

  addCaCertificateListener(listener: CaListener): void {
    this.listeners.add(listener);
    // grpc-js registers its own watcher only after this returns: the first answer must come later.
    process.nextTick(listener, { caCertificate: this.current });
    // Polling starts (again: grpc-js drops the listener of a channel idle for a while) with a look
    // at once, as the file may have changed meanwhile: a change reaches the listener moments later.
    void this.files.start();
  }

  removeCaCertificateListener(listener: CaListener): void {
    this.listeners.delete(listener);
    if (this.listeners.size === 0) this.files.stop();
  }

  /** No client certificate is presented. */
  addIdentityCertificateListener(): void {}
  removeIdentityCertificateListener(): void {}
}
