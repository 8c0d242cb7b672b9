"""The registry room: model packages, the registries that hold them, and the catalogue that names them.

Its public face, by module (import from the module; this package re-exports nothing):

* ``package``  - :class:`ModelPackage` (a folder of ``manifest.json`` + ``weights.safetensors``:
  verify, load), :func:`read_package`, :func:`write_package` (with :class:`PackageInfo`),
  :class:`PackageError`, :func:`default_input_contract`, :func:`shipped_registry_root`.
* ``registry`` - :class:`Registry`: one folder of packages; lists what it holds and publishes
  into it (atomically). :func:`user_registry_root`, :func:`default_registries`.
* ``catalog``  - :class:`Catalog`: the registries in use seen as one; the only place a name
  becomes a version (``get``, ``default``, ``ensemble``, the version a new package is published
  as). :func:`resolve_model` (a folder or a ref), :func:`resolve_ensemble`.
* ``manifest`` - the manifest's and the index's rules (validation, seal, provenance);
  ``listing`` - what ``lumbarseg models`` prints.
"""
