// The same trivial task as the core suite's noop, for piscina's baseline.
export default function noop() {
  return 0;
}
