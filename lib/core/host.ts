/** Which machine this process runs on, told apart from another with the same hostname. */
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';

let identity: string | undefined;

/**
 * The hostname and the kernel's boot id: processes that share shared memory share both (two
 * containers or hosts named alike do not share a boot id).
 */
export function hostIdentity(): string {
  // TRELLIS_HOST_ID: where hostnames and boot ids mislead (containers on one kernel, each with
  // a /dev/shm of its own), a name per shared-memory domain.
  identity ??= process.env.TRELLIS_HOST_ID || undefined;
  if (identity === undefined) {
    let bootId = '';
    try {
      bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      // Not Linux: the hostname alone.
    }
    identity = bootId ? `${hostname()} (boot ${bootId.slice(0, 8)})` : hostname();
  }
  return identity;
}
