import js from "@eslint/js";
import tseslint from "typescript-eslint";
import globals from "globals";

export default tseslint.config(
  { ignores: ["dist/", "node_modules/", "packages/", "coverage/", ".cache/"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  { languageOptions: { globals: globals.node } },
  {
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "no-restricted-imports": "off",
    },
  },
  {
    // bridges/* speak their protocol only: no Matrix code, no core internals.
    files: ["bridges/**/*.ts"],
    rules: {
      "no-restricted-imports": [
        "error",
        {
          patterns: [
            {
              group: ["matrix-appservice-bridge", "matrix-*"],
              message: "bridges/ must not import Matrix code",
            },
            {
              group: ["**/src/*", "!**/src/connector.js", "!**/src/errors.js", "!**/src/log.js"],
              message: "bridges/ may import only src/connector, src/errors and src/log",
            },
          ],
        },
      ],
    },
  },
);
