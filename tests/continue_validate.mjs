// Validate a Continue config.yaml with Continue's own code (npm @continuedev/config-yaml):
// parseConfigYaml (YAML.parse + configYamlSchema, what Continue runs on a local config.yaml)
// and validateConfigYaml (its extra checks). Keys the schema does not know are silently
// stripped by zod, so they are listed too: Continue would ignore them.
//   node continue_validate.mjs PACKAGE_DIR CONFIG_YAML  -> one JSON object on stdout
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [pkgDir, configPath] = process.argv.slice(2);
const modules = join(pkgDir, "node_modules");
const cy = await import(pathToFileURL(join(modules, "@continuedev/config-yaml/dist/index.js")).href);
const YAML = createRequire(join(modules, "noop.js"))("yaml");

const text = readFileSync(configPath, "utf8");
const version = JSON.parse(readFileSync(join(modules, "@continuedev/config-yaml/package.json"), "utf8")).version;

function dropped(raw, parsed, path = "") {
  if (raw === null || typeof raw !== "object") return [];
  if (parsed === null || typeof parsed !== "object") return [path || "(top)"];
  return Object.keys(raw).flatMap((k) =>
    k in parsed ? dropped(raw[k], parsed[k], path ? `${path}.${k}` : k) : [path ? `${path}.${k}` : k]);
}

const out = { version, ok: false, error: null, issues: [], warnings: [], dropped: [] };
try {
  const parsed = cy.parseConfigYaml(text);
  out.ok = true;
  out.dropped = dropped(YAML.parse(text), parsed);
  out.warnings = cy.validateConfigYaml(parsed).map((e) => ({ fatal: e.fatal, message: e.message }));
  if (out.warnings.some((w) => w.fatal)) out.ok = false;
} catch (e) {
  out.error = String(e.message || e);
  const result = cy.configYamlSchema.safeParse(YAML.parse(text));
  if (!result.success) {
    // a model entry is a union (a model, or `uses:` a hub block): list every branch's issues
    const flat = (issues) => issues.flatMap((i) =>
      i.code === "invalid_union" ? flat(i.unionErrors.flatMap((u) => u.issues)) : [i]);
    out.issues = flat(result.error.issues).map((i) => ({ code: i.code, path: i.path.join("."), message: i.message }));
  }
}
console.log(JSON.stringify(out));
