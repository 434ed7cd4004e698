"""Stand-ins for the Qt-only DICOM database of 3D Slicer (CTK's ``ctkDICOMDatabase`` and ``ctkDICOMIndexer``,
Slicer's ``DICOMLib.DICOMUtils.importDicom``), reproducing - from the sources of the CTK commit Slicer 5.8.1 builds
(commontk/CTK 82cae5781621845486bad2697aed095f04cfbe76, SuperBuild/External_CTK.cmake:73-75 in Slicer 5.8.1)
and of Slicer 5.8.1 - the behaviour DCEPerfusion.py and DCEPerfusionLib.scene.dicom depend on:

* ``fileForInstance(uid)``: the file's absolute path, "" for an unknown instance
  (Libs/DICOM/Core/ctkDICOMDatabase.cpp:2258-2275).
* ``insert`` of a file (the indexer's route, ctkDICOMDatabase.cpp:2786-2900): an instance already in the
  database is skipped when it is the same file, not modified since its insertion, and replaced otherwise
  (:2803-2836, :734-780); a data set without patient name, patient ID and study UID is refused - an empty
  patient ID becomes the study UID, an empty name the ID (:884-919); with ``storeFile`` the file is copied to
  ``<database folder>/dicom/<study>/<series>/<instance>.dcm`` (:692-731; the long-path form, without
  ``useShortStoragePath``'s hashing) and the database lists the copy, else the file where it is.
* ``ctkDICOMIndexer.addDirectory(db, folder, copyFile)``: every file under ``folder`` (subfolders and hidden files
  included) that DCMTK reads is inserted, with ``copyFile`` as ``storeFile``; other files are skipped with a
  warning; without background import it returns when done (Libs/DICOM/Core/ctkDICOMIndexer.cpp:466-497,
  :158-250). A folder with a DICOMDIR is read through the DICOMDIR instead (:479-482): not reproduced - the
  stand-in refuses it.
* ``DICOMUtils.importDicom(folder, db=None, copyFiles=False)``: the indexer's ``addDirectory`` then
  ``waitForImportFinished``; any exception is printed and False returned (Modules/Scripted/DICOMLib/DICOMUtils.py:
  486-502 in Slicer 5.8.1).
* ``isOpen`` and ``databaseDirectory`` are Qt properties, read as attributes (DICOM.py:526 in Slicer 5.8.1).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
import types

import pydicom

log = logging.getLogger("ctkDICOM")


def _read(path):
    """The data set DCMTK would index (ctkDICOMItem::InitializeFromFile), or None."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - DCMTK reports any unreadable file the same way
        return None


class DICOMDatabase:
    """ctkDICOMDatabase: closed until :meth:`openDatabase`; ``images`` {SOP Instance UID: record}."""

    def __init__(self):
        self.isOpen, self.databaseDirectory, self.images = False, "", {}

    def openDatabase(self, database_file):
        """ctkDICOMDatabase::openDatabase(<folder>/ctkDICOM.sql): the folder of that file is the database folder."""
        self.databaseDirectory = os.path.dirname(os.path.abspath(database_file))
        os.makedirs(self.databaseDirectory, exist_ok=True)
        self.isOpen = True

    def fileForInstance(self, sop_instance_uid):
        record = self.images.get(str(sop_instance_uid))
        return record["file"] if record else ""

    def instanceForFile(self, file_name):
        return next((uid for uid, r in self.images.items() if r["file"] == os.path.abspath(file_name)), "")

    def patients(self):
        return list(dict.fromkeys(r["patient_id"] for r in self.images.values()))

    def studiesForPatient(self, patient):
        return list(dict.fromkeys(r["study"] for r in self.images.values() if r["patient_id"] == patient))

    def seriesForStudy(self, study):
        return list(dict.fromkeys(r["series"] for r in self.images.values() if r["study"] == study))

    def filesForSeries(self, series):
        return [r["file"] for r in self.images.values() if r["series"] == series]

    def insert(self, filePath, storeFile=True, generateThumbnail=True, createHierarchy=True,
               destinationDirectoryName=""):
        ds = _read(filePath)
        if ds is None:
            log.warning("Could not read DICOM file:%s", filePath)
            return
        self._insert(ds, os.path.abspath(filePath), bool(storeFile))

    def _insert(self, ds, path, store_file, overwrite=False):
        if not self.isOpen:
            raise RuntimeError("ctkDICOMDatabase: the database is not open")
        uid = str(ds.get("SOPInstanceUID", ""))
        old = self.images.get(uid)
        if old is not None and not overwrite:
            if os.path.samefile(old["file"], path) if os.path.exists(old["file"]) else False:
                if os.path.getmtime(path) < old["inserted"]:
                    return                                            # up to date
            del self.images[uid]                                      # modified: re-indexed
        name, patient_id = str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        patient_id = patient_id or study
        name = name or patient_id
        if not (name and study and patient_id):
            log.error("Failed to insert file into database (required fields missing): %s", path)
            return
        stored = path
        if store_file and series:
            if not uid:
                return
            stored = os.path.join(self.databaseDirectory, "dicom", study, series, uid + ".dcm")
            os.makedirs(os.path.dirname(stored), exist_ok=True)
            shutil.copyfile(path, stored)
        self.images[uid] = {"file": stored, "patient_id": patient_id, "patient_name": name, "study": study,
                            "series": series, "inserted": time.time() + 1e-3}


class ctkDICOMIndexer:  # noqa: N801 - the CTK class name
    def __init__(self):
        self._database = None

    def setDatabase(self, database):
        self._database = database

    def addDirectory(self, *args, **kwargs):
        """addDirectory([db,] folder, copyFile=False, includeHidden=True)."""
        if args and isinstance(args[0], DICOMDatabase):
            self.setDatabase(args[0])
            args = args[1:]
        folder, copy_file = args[0], (args[1] if len(args) > 1 else kwargs.get("copyFile", False))
        if os.path.exists(os.path.join(folder, "DICOMDIR")):
            raise NotImplementedError("the stand-in does not read DICOMDIR folders")
        for root, _, files in os.walk(folder):
            for name in sorted(files):
                path = os.path.join(root, name)
                ds = _read(path)
                if ds is None:
                    log.warning("Could not read DICOM file:%s", path)
                    continue
                self._database._insert(ds, os.path.abspath(path), bool(copy_file))

    def waitForImportFinished(self, msecTimeout=-1):
        pass


def import_dicom(dicomDataDir, dicomDatabase=None, copyFiles=False):
    """DICOMUtils.importDicom (DICOMUtils.py:486-502 in Slicer 5.8.1)."""
    try:
        indexer = ctkDICOMIndexer()
        assert indexer is not None
        if dicomDatabase is None:
            import slicer
            dicomDatabase = slicer.dicomDatabase
        indexer.addDirectory(dicomDatabase, dicomDataDir, copyFiles)
        indexer.waitForImportFinished()
    except Exception:  # noqa: BLE001 - as Slicer does
        traceback.print_exc()
        logging.error("Failed to import DICOM folder " + dicomDataDir)
        return False
    return True


def modules():
    """{module name: module} to put in sys.modules: ``ctk`` (the indexer) and ``DICOMLib`` / ``DICOMLib.DICOMUtils``."""
    ctk = types.ModuleType("ctk")
    ctk.ctkDICOMIndexer = ctkDICOMIndexer
    utils = types.ModuleType("DICOMLib.DICOMUtils")
    utils.importDicom = import_dicom
    lib = types.ModuleType("DICOMLib")
    lib.DICOMUtils = utils
    return {"ctk": ctk, "DICOMLib": lib, "DICOMLib.DICOMUtils": utils}
