/**
 * The little XML S3 and STS answer in: the text of flat elements (no nesting within the tags read),
 * entities decoded; and escaping for the bodies sent.
 */

function decodeXml(text: string): string {
  return text.replace(/&(?:#x([0-9a-f]+)|#(\d+)|(amp|lt|gt|quot|apos));/gi, (_, hex: string, decimal: string, name: string) => {
    if (hex) return String.fromCodePoint(parseInt(hex, 16));
    if (decimal) return String.fromCodePoint(Number(decimal));
    return { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" }[name.toLowerCase() as 'amp']!;
  });
}

/** The texts of every `<tag>` element (S3's answers have no nesting within the tags read here). */
export function xmlValues(xml: string, tag: string): string[] {
  const found: string[] = [];
  const pattern = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`, 'g');
  for (let match = pattern.exec(xml); match; match = pattern.exec(xml)) found.push(decodeXml(match[1]));
  return found;
}

export const xmlValue = (xml: string, tag: string): string | undefined => xmlValues(xml, tag)[0];

export const escapeXml = (text: string): string => text.replace(/[&<>"']/g, (character) => `&${{ '&': 'amp', '<': 'lt', '>': 'gt', '"': 'quot', "'": 'apos' }[character]};`);
