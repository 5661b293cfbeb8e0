/**
 * Encryption between hosts: where TRELLIS_TLS_CERT, TRELLIS_TLS_KEY and TRELLIS_TLS_CA name PEM
 * files, every TCP connection of the cluster (driver and agents, agents' workers, agents between
 * themselves, the broker and its hosts and drivers) is TLS, both ends showing a certificate that
 * the CA signed (mutual TLS, as Ray's RAY_USE_TLS). Host names are not checked: the CA is the
 * cluster's own, and whoever holds a certificate it signed is in. Unix sockets on one host stay
 * plain. Set the same variables on every host; the workers inherit them.
 */
import { readFileSync } from 'node:fs';
import { connect as connectPlain, createServer as createPlainServer, type Server, type Socket } from 'node:net';
import { connect as connectSecure, createSecureContext, createServer as createSecureServer, type SecureContext } from 'node:tls';
import { InvalidArgumentError } from '../errors.js';

interface Credentials {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
}

const VARIABLES = ['TRELLIS_TLS_CERT', 'TRELLIS_TLS_KEY', 'TRELLIS_TLS_CA'] as const;

/** The last credentials read, by the paths they came from: a connection does not read the files again. */
let cached: { paths: string; credentials: Credentials; context: SecureContext } | undefined;

/** The cluster's TLS credentials, read from the files the environment names; undefined without them. */
export function tlsCredentials(): Credentials | undefined {
  return secured()?.credentials;
}

/** Credentials and their parsed context, read once per set of paths. */
function secured(): { credentials: Credentials; context: SecureContext } | undefined {
  const paths = VARIABLES.map((name) => process.env[name]);
  if (paths.every((path) => !path)) return undefined;
  if (cached?.paths === paths.join('\0')) return cached;
  const missing = VARIABLES.filter((_, index) => !paths[index]);
  if (missing.length > 0) throw new InvalidArgumentError(`TLS needs ${VARIABLES.join(', ')} together; ${missing.join(' and ')} ${missing.length > 1 ? 'are' : 'is'} not set`, 'ERR_TLS_CONFIG');
  const read = (index: number) => {
    try {
      return readFileSync(paths[index]!);
    } catch (error) {
      throw new InvalidArgumentError(`${VARIABLES[index]} names ${paths[index]}, which cannot be read: ${(error as Error).message}`, 'ERR_TLS_CONFIG');
    }
  };
  const credentials = { cert: read(0), key: read(1), ca: read(2) };
  cached = { paths: paths.join('\0'), credentials, context: createSecureContext(credentials) };
  return cached;
}

/**
 * Opens a TCP connection, over TLS where the cluster has credentials. `ready` is the event that
 * says it may be used: 'secureConnect' (after the handshake) or 'connect'.
 */
export function dial(host: string, port: number): { socket: Socket; ready: 'connect' | 'secureConnect' } {
  const secure = secured();
  if (!secure) return { socket: connectPlain({ host, port }), ready: 'connect' };
  const socket = connectSecure({ host, port, secureContext: secure.context, checkServerIdentity: () => undefined });
  return { socket, ready: 'secureConnect' };
}

/** A TCP server, over TLS where the cluster has credentials; `accept` gets each connection once usable. */
export function serve(accept: (socket: Socket) => void): Server {
  const credentials = tlsCredentials();
  if (!credentials) return createPlainServer(accept);
  const server = createSecureServer({ ...credentials, requestCert: true, rejectUnauthorized: true }, accept);
  // A peer without a certificate of the cluster's CA: its connection is dropped, the server goes on.
  server.on('tlsClientError', () => undefined);
  return server;
}
